"""The app's inference worker: micro-batching, streaming, cancellation, errors (tiny model)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from rlhf_pl.app.worker import GenerationError, InferenceWorker
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import pad_left
from rlhf_pl.data.formats import Message
from rlhf_pl.models.generate import GreedySampler, generate
from rlhf_pl.plugins.samplers import NoEOSSampler

PROMPTS = ["What is 2 plus 3?", "Spell the word cat backwards, please, one letter at a time."]


@pytest.fixture()
def greedy_worker(tiny_model, tiny_tokenizer):
    worker = InferenceWorker(tiny_model, tiny_tokenizer, GreedySampler(), max_batch=8, batch_window_s=0.2,
                             max_new_tokens=12)
    worker.start()
    yield worker
    worker.stop()


async def _collect(stream) -> tuple[str, dict]:
    """Concatenated text deltas of row 0 and the final event."""
    text, last = "", {}
    async for event in stream:
        if event.get("row") == 0:
            text += event["text"]
        last = event
    return text, last


def _alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer to ``prompt`` generated on its own (no batch, no worker)."""
    ids, mask = pad_left([tokenize_prompt(tokenizer, [Message("user", prompt)])], tokenizer.pad_token_id)
    out = generate(model, ids, mask, GreedySampler(), max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    tokens = out.response[0, out.response_mask[0].bool()].tolist()
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id], skip_special_tokens=True).strip()


def test_coinciding_requests_share_a_batch_and_match_unbatched_greedy_answers(greedy_worker, tiny_model,
                                                                               tiny_tokenizer):
    async def main():
        streams = [greedy_worker.submit([Message("user", p)]) for p in PROMPTS]
        return await asyncio.gather(*(_collect(s) for s in streams))

    results = asyncio.run(main())
    assert greedy_worker.stats.batches == 1 and greedy_worker.stats.max_batch_rows == 2
    for prompt, (streamed, last) in zip(PROMPTS, results):
        expected = _alone(tiny_model, tiny_tokenizer, prompt, 12)
        assert last["done"] and last["texts"] == [expected]  # left padding in the batch changes nothing
        assert streamed.strip() == expected  # the streamed deltas add up to the answer


def test_n_samples_per_request_and_the_batch_limit(tiny_model, tiny_tokenizer):
    sampler = NoEOSSampler(1.0, tiny_tokenizer.eos_token_id)
    worker = InferenceWorker(tiny_model, tiny_tokenizer, sampler, max_batch=4, batch_window_s=0.2, max_new_tokens=6)
    worker.start()
    try:
        async def main():
            first = worker.submit([Message("user", "a")], n=3)
            second = worker.submit([Message("user", "b")], n=3)  # 3 + 3 > 4 rows: waits for the next batch
            return await first.result(), await second.result()

        a, b = asyncio.run(main())
        assert len(a) == 3 and len(b) == 3
        assert worker.stats.batches == 2 and worker.stats.max_batch_rows == 3
        assert worker.stats.tokens == 6 * 6  # no EOS: every row used its whole budget of 6 tokens
        with pytest.raises(GenerationError, match="between 1 and the worker's batch size 4"):
            asyncio.run(_submit(worker, n=5))
    finally:
        worker.stop()


async def _submit(worker, n):
    return worker.submit([Message("user", "x")], n=n)


def test_a_cancelled_stream_stops_its_rows_and_is_counted(tiny_model, tiny_tokenizer):
    sampler = NoEOSSampler(1.0, tiny_tokenizer.eos_token_id)
    worker = InferenceWorker(tiny_model, tiny_tokenizer, sampler, max_batch=4, batch_window_s=0.0,
                             max_new_tokens=400)
    worker.start()
    try:
        async def main():
            stream = worker.submit([Message("user", "never stops")])
            async for event in stream:
                if "text" in event:
                    stream.cancel()
                    break
            await asyncio.get_running_loop().run_in_executor(None, stream.finished.wait, 30)
            return stream

        stream = asyncio.run(main())
        assert stream.finished.is_set() and worker.stats.cancelled == 1
        assert worker.stats.tokens < 400  # it stopped long before its budget
    finally:
        worker.stop()


def test_a_request_that_is_not_a_prompt_is_refused_and_a_failing_batch_reports_its_error(tiny_tokenizer):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kwargs):
            raise RuntimeError("out of memory (simulated)")

    worker = InferenceWorker(Broken(), tiny_tokenizer, GreedySampler(), max_new_tokens=4)
    worker.start()
    try:
        with pytest.raises(GenerationError, match="ending with a user turn"):
            asyncio.run(_submit_messages(worker, [Message("assistant", "hi")]))

        async def main():
            return await worker.submit([Message("user", "hi")]).result()

        with pytest.raises(GenerationError, match="out of memory"):
            asyncio.run(main())
        assert worker._thread.is_alive()  # the worker survives a failed batch
    finally:
        worker.stop()


async def _submit_messages(worker, messages):
    return worker.submit(messages)
