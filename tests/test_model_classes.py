"""Images, audio, Azure AI Search and the legacy extensions path go through the proxy too."""

from __future__ import annotations

import base64

import openai
import pytest

from tests.harness import AppHost, EventSetup, Simulator, Storage, wav


@pytest.fixture
def setup(host: AppHost, sim: Simulator) -> EventSetup:
    event = EventSetup(host, sim)
    event.add_resource(sim.url, "dall-e-3", "openai-images")
    event.add_resource(sim.url, "whisper", "openai-audio")
    event.add_resource(sim.url, "hotels", "azure-ai-search", upstream_deployment="hotels-v2")
    return event


def azure(host: AppHost, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=key, api_version="2024-10-21", max_retries=0
    )


def test_image_generation_through_the_sdk(
    host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    result = azure(host, setup.key).images.generate(
        model="dall-e-3", prompt="a lighthouse at dusk", n=2, response_format="b64_json"
    )
    assert len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json or "").startswith(b"\x89PNG")
    [record] = storage.usage(setup.id, expect=1)
    assert record["model_class"] == "openai-images"
    assert record["units"] == 2 and record["total_tokens"] == 0


def test_image_generation_on_the_v1_path(host: AppHost, setup: EventSetup) -> None:
    client = openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=setup.key, max_retries=0)
    result = client.images.generate(model="dall-e-3", prompt="a red kite")
    assert result.data[0].url and result.data[0].url.startswith("data:image/png;base64,")


def test_audio_transcription_is_forwarded_as_multipart(
    host: AppHost, setup: EventSetup, sim: Simulator, storage: Storage
) -> None:
    result = azure(host, setup.key).audio.transcriptions.create(
        model="whisper", file=("talk.wav", wav(3.2)), response_format="verbose_json"
    )
    assert result.text
    assert result.duration == pytest.approx(3.2, abs=0.01)
    [record] = storage.usage(setup.id, expect=1)
    assert record["model_class"] == "openai-audio"
    assert record["units"] == 4  # audio seconds, rounded up


def test_audio_transcription_as_plain_text(host: AppHost, setup: EventSetup) -> None:
    text = azure(host, setup.key).audio.transcriptions.create(
        model="whisper", file=("talk.wav", wav(1.0)), response_format="text"
    )
    assert isinstance(text, str) and len(text.split()) >= 1


def test_audio_without_multipart_is_refused(host: AppHost, setup: EventSetup) -> None:
    path = "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21"
    response = host.http.post(path, json={"file": "x"}, headers={"api-key": setup.key})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "path",
    [
        "/indexes/hotels/docs/search?api-version=2024-07-01",
        "/indexes('hotels')/docs/search.post.search?api-version=2024-07-01",
    ],
)
def test_search_swaps_the_attendee_key_for_the_resource_key(
    host: AppHost, setup: EventSetup, sim: Simulator, storage: Storage, path: str
) -> None:
    response = host.http.post(
        path, json={"search": "sea view", "top": 2}, headers={"api-key": setup.key}
    )
    assert response.status_code == 200, response.text
    assert [d["id"] for d in response.json()["value"]] == ["1", "2"]
    upstream = sim.stats()["last_requests"][-1]
    assert upstream["path"] == "/indexes/hotels-v2/docs/search"  # the real index name
    assert upstream["headers"]["api-key"] == {"present": True, "valid": True}
    [record] = storage.usage(setup.id, expect=1)
    assert record["model_class"] == "azure-ai-search" and record["units"] == 1


def test_search_index_not_in_the_catalog_is_not_found(host: AppHost, setup: EventSetup) -> None:
    response = host.http.post(
        "/indexes/products/docs/search", json={"search": "x"}, headers={"api-key": setup.key}
    )
    assert response.status_code == 404
    assert "hotels" in response.json()["error"]["message"]


def test_legacy_extensions_chat_path(host: AppHost, setup: EventSetup, sim: Simulator) -> None:
    path = "/openai/deployments/gpt-4o-mini/extensions/chat/completions?api-version=2024-02-01"
    body = {"messages": [{"role": "user", "content": "What do my documents say?"}], "max_tokens": 5}
    response = host.http.post(path, json=body, headers={"api-key": setup.key})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5
    assert sim.stats()["last_requests"][-1]["path"].endswith("/extensions/chat/completions")
