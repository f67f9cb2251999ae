"""What calls cost: the usage details each record keeps (cached, reasoning and audio tokens, the
model that answered) and its cost at the shipped prices or the resource's own, checked against
figures worked out by hand, through the host stand-in and a real worker."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from shared.governance import prices
from tests.harness import AppHost, EventSetup, Simulator, Storage, wav

pytestmark = pytest.mark.e2e

# The table's figures per 1M tokens, in billionths of a dollar per token (x 1000):
# gpt-4o-mini 0.15 / 0.075 cached / 0.60, o4-mini 1.10 / 0.275 / 4.40,
# text-embedding-3-small 0.02, gpt-4.1-nano 0.10 / 0.025 / 0.40.
MINI = (150, 75, 600)
O4_MINI = (1100, 275, 4400)
NANO_41 = (100, 25, 400)
EMBEDDING_SMALL = 20
LONG = "Please read this carefully. " + "the river and the mountain " * 300  # > 1024 tokens


def azure(host: AppHost, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=host.base, api_key=key, api_version="2025-03-01-preview", max_retries=0
    )


def by_hand(record: dict, figures: tuple[int, int, int]) -> int:
    """The cost in billionths from the record's tokens and the per-token figures."""
    fresh = record["prompt_tokens"] - record["cached_tokens"]
    return (
        fresh * figures[0]
        + record["cached_tokens"] * figures[1]
        + (record["completion_tokens"] * figures[2])
    )


@pytest.fixture
def setup(host: AppHost, sim: Simulator) -> EventSetup:
    event = EventSetup(host, sim)
    event.add_resource(sim.url, "o4-mini", "openai-chat")
    event.add_resource(sim.url, "dall-e-3", "openai-images")
    event.add_resource(sim.url, "whisper", "openai-audio")
    event.add_resource(sim.url, "tts", "openai-audio")
    return event


def test_chat_streamed_and_not_with_cached_tokens_costs_what_the_table_says(
    host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    client = azure(host, setup.key)
    plain = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert plain.model == "gpt-4o-mini-2024-07-18"
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": LONG}], max_tokens=5
    )
    assert first.usage is not None and first.usage.prompt_tokens > 1024
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The same long prompt again, streamed without asking for usage: the proxy asks for it.
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": LONG}], max_tokens=5,
            stream=True,
        )
    )  # fmt: skip
    assert all(chunk.usage is None for chunk in chunks)
    records = storage.usage(setup.id, expect=3)
    assert [r["model"] for r in records] == ["gpt-4o-mini-2024-07-18"] * 3
    short, long_, again = records
    assert short["cached_tokens"] == long_["cached_tokens"] == 0
    # Cached: the first 1024 tokens and each further full 128, as Azure counts them.
    prompt = again["prompt_tokens"]
    assert again["streamed"] and again["cached_tokens"] == prompt - (prompt - 1024) % 128 >= 1024
    for record in records:
        assert record["cost_nano"] == by_hand(record, MINI) > 0
        assert not record["unpriced"] and record["price_source"] == "gpt-4o-mini@2025-06-01"
    # e.g. 1509 prompt tokens of which 1408 cached, and 5 out: 101 x 150 + 1408 x 75 + 5 x 600.
    assert again["cost_nano"] < long_["cost_nano"]


def test_reasoning_tokens_are_output_and_priced_so(
    host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    client = azure(host, setup.key)
    answer = client.chat.completions.create(
        model="o4-mini", messages=[{"role": "user", "content": "Think."}], max_completion_tokens=40
    )
    assert answer.model == "o4-mini-2025-04-16"
    assert answer.usage is not None and answer.usage.completion_tokens_details.reasoning_tokens == 8
    streamed = list(
        client.chat.completions.create(
            model="o4-mini", messages=[{"role": "user", "content": "Think."}],
            max_completion_tokens=40, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert streamed[-1].usage is not None
    reply = client.responses.create(model="o4-mini", input="Think.", max_output_tokens=40)
    assert reply.usage is not None and reply.usage.output_tokens_details.reasoning_tokens == 8
    for record in storage.usage(setup.id, expect=3):
        assert record["reasoning_tokens"] == 8 and record["model"] == "o4-mini-2025-04-16"
        assert record["completion_tokens"] == 16 + 8
        assert record["cost_nano"] == by_hand(record, O4_MINI)
        assert record["price_source"] == "o4-mini@2025-06-01"


def test_responses_streamed_and_not_are_costed(
    host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    client = azure(host, setup.key)
    reply = client.responses.create(model="gpt-4o-mini", input="Hello there.")
    assert reply.usage is not None
    events = list(client.responses.create(model="gpt-4o-mini", input="Hello.", stream=True))
    assert events[-1].type == "response.completed"
    plain, streamed = storage.usage(setup.id, expect=2)
    assert plain["prompt_tokens"] == reply.usage.input_tokens
    assert not plain["streamed"] and streamed["streamed"]
    for record in (plain, streamed):
        assert record["model"] == "gpt-4o-mini-2024-07-18"
        assert record["cost_nano"] == by_hand(record, MINI) > 0


def test_embeddings_images_and_audio_are_costed_in_their_units(
    host: AppHost, setup: EventSetup, storage: Storage
) -> None:
    client = azure(host, setup.key)
    client.embeddings.create(model="text-embedding-3-small", input="some words to embed")
    client.images.generate(model="dall-e-3", prompt="a lighthouse", n=2, response_format="b64_json")
    client.audio.transcriptions.create(
        model="whisper", file=("talk.wav", wav(3.2)), response_format="verbose_json"
    )
    said = "Welcome to the workshop."
    client.audio.speech.create(model="tts", voice="alloy", input=said)
    embedded, images, heard, spoken = storage.usage(setup.id, expect=4)
    assert embedded["cost_nano"] == embedded["prompt_tokens"] * EMBEDDING_SMALL > 0
    assert images["units"] == 2 and images["cost_nano"] == 2 * 40_000_000  # $0.04 each
    # 4 seconds (3.2 rounded up) at $0.006 a minute; speech at $15 per 1M characters.
    assert heard["units"] == 4 and heard["cost_nano"] == 4 * 6_000_000 // 60
    assert spoken["units"] == len(said) and spoken["cost_nano"] == len(said) * 15_000
    assert [r["price_source"].partition("@")[0] for r in (images, heard, spoken)] == [
        "dall-e-3", "whisper", "tts"
    ]  # fmt: skip
    assert not any(r["unpriced"] for r in (embedded, images, heard, spoken))


def test_a_model_without_a_price_is_unpriced_never_free_and_a_resource_can_price_it(
    host: AppHost, setup: EventSetup, sim: Simulator, storage: Storage
) -> None:
    client = azure(host, setup.key)
    # gpt-35-turbo-instruct has no price in the table.
    client.completions.create(model="gpt-35-turbo-instruct", prompt="Say hi", max_tokens=3)
    # A model router answers with a model of its choice: priced as that model, or unpriced.
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "[sim:model=gpt-4.1-nano-2025-04-14] hi"}],
        max_tokens=3,
    )
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "[sim:model=brand-new-model] hi"}],
        max_tokens=3,
    )
    completion, routed, unknown = storage.usage(setup.id, expect=3)
    assert completion["unpriced"] and completion["cost_nano"] == 0
    assert routed["model"] == "gpt-4.1-nano-2025-04-14" and not routed["unpriced"]
    assert routed["cost_nano"] == by_hand(routed, NANO_41)
    assert unknown["model"] == "brand-new-model" and unknown["unpriced"]
    report = host.manage.get(f"/events/{setup.id}/usage", params={"group_by": "deployment"})
    rows = {row["deployment"]: row for row in report.json()["rows"]}
    assert rows["gpt-35-turbo-instruct"]["unpriced"] == 1 and rows["gpt-4o-mini"]["unpriced"] == 1
    assert rows["gpt-4o-mini"]["cost_nano"] == routed["cost_nano"]
    assert Decimal(rows["gpt-4o-mini"]["cost"]) == Decimal(routed["cost_nano"]) / 10**9

    # The resource's own prices, over the table's (here: a house rate for the instruct model).
    resource = setup.add_resource(
        sim.url, "instruct-priced", "openai-completions",
        upstream_deployment="gpt-35-turbo-instruct", prices="input=1.5, output=2",
    )  # fmt: skip
    assert resource["prices"] == "input=1.5,output=2"
    client.completions.create(model="instruct-priced", prompt="Say hi", max_tokens=3)
    records = storage.usage(setup.id, expect=4)
    priced = records[-1]
    assert priced["price_source"] == "resource" and not priced["unpriced"]
    assert (
        priced["cost_nano"] == priced["prompt_tokens"] * 1500 + priced["completion_tokens"] * 2000
    )

    # A dear price: costs past 2**31 billionths (2.15 dollars) are kept whole, in reports too.
    setup.add_resource(
        sim.url, "instruct-dear", "openai-completions",
        upstream_deployment="gpt-35-turbo-instruct", prices="input=1000000,output=1000000",
    )  # fmt: skip
    client.completions.create(model="instruct-dear", prompt="Say hi", max_tokens=3)
    dear = storage.usage(setup.id, expect=5)[-1]
    expected = (dear["prompt_tokens"] + dear["completion_tokens"]) * 10**9
    report = host.manage.get(f"/events/{setup.id}/usage", params={"group_by": "deployment"})
    row = next(r for r in report.json()["rows"] if r["deployment"] == "instruct-dear")
    assert row["cost_nano"] == expected > 2**31 and Decimal(row["cost"]) == expected // 10**9


def test_prices_that_are_not_figures_are_refused(host: AppHost, sim: Simulator) -> None:
    body = {
        "name": "x", "deployment": "x", "model_class": "openai-chat", "endpoint": sim.url,
        "api_key": "k",
    }  # fmt: skip
    for bad in ("input=abc", "gold=1", "input=-1", "input=1,input=2", "input=1e400", "output"):
        answer = host.manage.post("/resources", json={**body, "prices": bad})
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["details"][0]["field"] == "prices"


def test_model_names_map_to_their_priced_base_model() -> None:
    assert prices.base_model("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert prices.base_model("GPT-4o-Global") == "gpt-4o"
    assert prices.base_model("o3-mini-2025-01-31") == "o3-mini"
    assert prices.base_model("tts-1-hd") == "tts-hd"
    assert prices.price_of("gpt-4o-mini-2024-07-18") == prices.price_of("gpt-4o-mini")
    assert prices.price_of("gpt-4o-2024-11-20") != prices.price_of("gpt-4o-mini")
    assert prices.price_of("no-such-model") is None
    # Cached tokens of a model with no cached price are priced as input: never below cost.
    price = prices.price_of("", "input=2,output=4")
    cost = prices.cost_of(price, "openai-chat", prompt=1000, cached=400, completion=10)
    assert cost.nano == 1000 * 2000 + 10 * 4000 and cost.priced
    # Audio tokens without an audio price: unpriced, not free.
    audio = prices.cost_of(prices.price_of("gpt-4o"), "openai-chat", prompt=100, audio=50)
    assert not audio.priced
    assert prices.as_amount(1_234_500) == "0.0012345"


@pytest.mark.parametrize("direction", ["input", "output"])
def test_audio_tokens_are_recorded_and_need_an_audio_price(
    host: AppHost, setup: EventSetup, sim: Simulator, storage: Storage, direction: str
) -> None:
    """Audio heard in the prompt or spoken in the answer: recorded, priced at the resource's
    audio figure, and unpriced where no price has one (the table's gpt-4o-mini has none)."""
    field = "audio_tokens" if direction == "input" else "audio_output_tokens"
    setup.add_resource(
        sim.url, f"voice-{direction}", "openai-chat", upstream_deployment="gpt-4o-mini",
        prices=f"input=2.5,output=10,audio_{direction}=80",
    )  # fmt: skip
    client = azure(host, setup.key)
    said = [{"role": "user", "content": f"[sim:{field}=3] hello"}]
    for deployment in (f"voice-{direction}", "gpt-4o-mini"):
        answer = client.chat.completions.create(model=deployment, messages=said, max_tokens=8)
        assert answer.usage is not None
        usage = answer.usage
        details = (
            usage.prompt_tokens_details if direction == "input" else usage.completion_tokens_details
        )
        assert details is not None and details.audio_tokens == 3
    priced, unpriced = storage.usage(setup.id, expect=2)
    assert priced[field] == unpriced[field] == 3
    text_in = priced["prompt_tokens"] - (3 if direction == "input" else 0)
    text_out = priced["completion_tokens"] - (3 if direction == "output" else 0)
    assert priced["cost_nano"] == text_in * 2500 + text_out * 10_000 + 3 * 80_000
    assert not priced["unpriced"] and priced["price_source"] == "resource+gpt-4o-mini@2025-06-01"
    # No audio price: unpriced, not charged as text.
    assert unpriced["unpriced"] and unpriced["cost_nano"] == 0
