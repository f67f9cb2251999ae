"""GET /models lists the event's catalog, for both SDK styles, and only what the key may use."""

from __future__ import annotations

import openai
import pytest

from tests.harness import AppHost, EventSetup, Simulator

CATALOG = ["dall-e-3", "gpt-35-turbo-instruct", "gpt-4o-mini", "text-embedding-3-small", "tts"]


@pytest.fixture
def setup(host: AppHost, sim: Simulator) -> EventSetup:
    event = EventSetup(host, sim)
    event.add_resource(sim.url, "dall-e-3", "openai-images")
    event.add_resource(sim.url, "tts", "openai-audio")
    event.add_resource(sim.url, "hotels", "azure-ai-search")  # an index, not a model
    event.add_resource(sim.url, "gpt-4o-mini", "openai-chat", region="second member")
    return event


def clients(host: AppHost, key: str) -> list[openai.OpenAI]:
    return [
        openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=key, max_retries=0),
        openai.AzureOpenAI(
            azure_endpoint=host.base, api_key=key, api_version="2025-04-01-preview", max_retries=0
        ),
        openai.AzureOpenAI(
            azure_endpoint=f"{host.base}/v1", api_key=key, api_version="2024-10-21", max_retries=0
        ),
    ]


def test_models_list_equals_the_catalog_for_every_client(host: AppHost, setup: EventSetup) -> None:
    for client in clients(host, setup.key):
        models = list(client.models.list())
        assert [m.id for m in models] == CATALOG
        assert {m.object for m in models} == {"model"}
        assert all(m.created > 1_700_000_000 and m.owned_by == "aiproxy" for m in models)
        chat = client.models.retrieve("gpt-4o-mini")
        assert chat.id == "gpt-4o-mini"
        assert chat.model_extra["model_class"] == "openai-chat"
        assert chat.model_extra["capabilities"]["chat_completion"] is True
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("hotels")
        assert missing.value.code == "deployment_not_found"
        assert "gpt-4o-mini" in missing.value.message


def test_the_list_follows_the_catalog_and_is_the_keys_own(
    host: AppHost, sim: Simulator, setup: EventSetup
) -> None:
    other = EventSetup(host, sim, name="Other event")
    other.add_resource(sim.url, "o4-mini", "openai-chat")
    client = clients(host, setup.key)[0]
    assert "o4-mini" not in [m.id for m in client.models.list()]
    assert "o4-mini" in [m.id for m in clients(host, other.key)[0].models.list()]
    (tts,) = [rid for rid, r in setup.resources.items() if r["deployment"] == "tts"]
    assert host.manage.delete(f"/events/{setup.id}/resources/{tts}").status_code == 204
    assert [m.id for m in client.models.list()] == [m for m in CATALOG if m != "tts"]
    refused = host.http.get("/openai/v1/models", headers={"api-key": "aip-" + "0" * 32})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
