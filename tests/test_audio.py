"""Audio through the proxy: speech streamed through as bytes, translations, the v1 paths, and
each metered in its unit (characters for speech, seconds for the rest)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from local.simulator import speech_audio
from tests.harness import AppHost, EventSetup, Simulator, Storage, wav

TEXT = "Welcome to the workshop. Today we build an agent that answers questions."


@pytest.fixture
def setup(host: AppHost, sim: Simulator) -> EventSetup:
    event = EventSetup(host, sim)
    event.add_resource(sim.url, "tts", "openai-audio", upstream_deployment="tts-hd")
    event.add_resource(sim.url, "whisper", "openai-audio")
    return event


def test_speech_bytes_are_passed_through_and_metered_in_characters(
    host: AppHost, setup: EventSetup, sim: Simulator, storage: Storage
) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=setup.key, api_version="2025-03-01-preview", max_retries=0
    )
    spoken = azure.audio.speech.create(model="tts", voice="alloy", input=TEXT)
    assert spoken.content == speech_audio(TEXT, "mp3")
    assert spoken.response.headers["content-type"] == "audio/mpeg"
    assert sim.stats()["last_requests"][-1]["path"] == "/openai/deployments/tts-hd/audio/speech"
    v1 = openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=setup.key, max_retries=0)
    wav_bytes = v1.audio.speech.create(
        model="tts", voice="nova", input="Short.", response_format="wav"
    ).content
    assert wav_bytes == speech_audio("Short.", "wav") and wav_bytes[:4] == b"RIFF"
    first, second = storage.usage(setup.id, expect=2)
    assert first["model_class"] == "openai-audio" and first["deployment"] == "tts"
    assert (first["units"], second["units"]) == (len(TEXT), len("Short."))
    assert first["total_tokens"] == 0 and first["outcome"] == "ok" and first["status"] == 200


def test_speech_arrives_as_the_upstream_sends_it(host: AppHost, setup: EventSetup) -> None:
    text = "Slowly, please. [sim:latency_ms_per_token=120]"
    arrivals: list[tuple[float, int]] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{host.base}/openai/deployments/tts/audio/speech?api-version=2025-03-01-preview",
        json={"model": "tts", "voice": "alloy", "input": text},
        headers={"api-key": setup.key},
        timeout=30,
    ) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_raw():
            arrivals.append((time.perf_counter() - started, len(chunk)))
    assert sum(size for _, size in arrivals) == len(speech_audio(text, "mp3"))
    # Eight writes 120 ms apart upstream: the first bytes are here long before the last.
    assert arrivals[-1][0] - arrivals[0][0] > 0.5, arrivals


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's translations
def test_translations_and_v1_audio_paths(
    host: AppHost, setup: EventSetup, sim: Simulator, storage: Storage
) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=setup.key, api_version="2024-10-21", max_retries=0
    )
    translated = azure.audio.translations.create(
        model="whisper", file=("talk.wav", wav(2.5)), response_format="verbose_json"
    )
    assert translated.text
    assert sim.stats()["last_requests"][-1]["path"].endswith("/whisper/audio/translations")
    v1 = openai.OpenAI(base_url=f"{host.base}/openai/v1", api_key=setup.key, max_retries=0)
    heard = v1.audio.transcriptions.create(
        model="whisper", file=("talk.wav", wav(1.2)), response_format="verbose_json"
    )
    assert heard.text
    again = v1.audio.translations.create(model="whisper", file=("talk.wav", wav(0.5)))
    assert again.text
    with pytest.raises(openai.NotFoundError) as missing:
        v1.audio.transcriptions.create(model="gpt-4o-mini", file=("talk.wav", wav(0.5)))
    assert missing.value.code == "deployment_not_found" and "whisper" in missing.value.message
    records = storage.usage(setup.id, expect=3)
    assert [r["units"] for r in records] == [3, 2, 0]  # seconds, rounded up; json has none
