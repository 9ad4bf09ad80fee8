"""The inference worker: one thread owns the model; web handlers queue requests and read tokens back.

The web server's event loop never runs the model. A handler calls :meth:`InferenceWorker.submit`
(non-blocking) and iterates the returned :class:`Stream` (``async for event in stream``). The
worker thread takes the first waiting request, waits up to ``batch_window_s`` for more, and
generates for all of them together (up to ``max_batch`` sequences: a request for ``n`` samples
brings ``n`` rows) with the generation backend (``generation=hf|static``, :mod:`rlhf_pl.generation`);
after every decoding step it hands each row's new text to its request's stream (thread-safe,
through the event loop). Requests that arrive meanwhile wait for the next batch. A cancelled stream
(:meth:`Stream.cancel`: the client closed its tab) ends its rows at the next step; a batch whose
rows are all cancelled or finished stops there.

Torch releases the GIL inside its kernels, so the event loop keeps serving while the worker
generates. Shapes: ``b`` rows in a batch, ``p`` the longest prompt.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import torch

from rlhf_pl.app.db import storable
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import pad_left
from rlhf_pl.data.formats import Message
from rlhf_pl.sampling import HF, model_device

log = logging.getLogger("rlhf_pl.app.worker")


class GenerationError(RuntimeError):
    """The worker could not generate for a request (the message is shown to the user)."""


@dataclass
class WorkerStats:
    """Counters the admin page and the tests read."""

    requests: int = 0
    batches: int = 0
    max_batch_rows: int = 0  # the most rows generated together so far
    cancelled: int = 0  # requests whose stream was cancelled before they finished
    tokens: int = 0  # tokens generated for rows that were still wanted


_END = object()


class Stream:
    """The events of one request, read on the event loop: ``{"row": i, "text": delta}`` while
    generating, then one ``{"done": True, "texts": [...], "ended": [...]}`` (or ``{"error": msg}``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop, self.n = loop, n
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def put(self, event: Any) -> None:
        """Thread-safe: called by the worker."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            event = await self.events.get()
            if event is _END:
                return
            yield event

    async def result(self) -> list[str]:
        """Wait for the end and return the ``n`` texts (raises :class:`GenerationError`)."""
        async for event in self:
            if "error" in event:
                raise GenerationError(event["error"])
            if event.get("done"):
                return list(event["texts"])
        raise GenerationError("the generation ended without a result")


@dataclass
class _Request:
    prompt_ids: list[int]
    n: int
    max_new_tokens: int
    stream: Stream
    queued_at: float = field(default_factory=time.monotonic)


class _Row:
    """One generated sequence: its tokens so far and the text already handed out."""

    def __init__(self, request: _Request, index: int) -> None:
        self.request, self.index = request, index
        self.tokens: list[int] = []
        self.text = ""
        self.ended = False  # EOS, its request's token budget, or its request cancelled


class InferenceWorker:
    """Owns ``model`` (eval mode) in one thread; see the module docstring. ``autocast()`` is entered
    around every generation (the precision strategy's inference autocast)."""

    def __init__(self, model: Any, tokenizer: Any, sampler: Any, *, max_batch: int = 8, batch_window_s: float = 0.02,
                 max_new_tokens: int = 96, seed: int = 0,
                 autocast: Callable[[], Any] = contextlib.nullcontext, backend: Any = None) -> None:
        self.model, self.tokenizer, self.sampler = model.eval(), tokenizer, sampler
        self.max_batch, self.batch_window_s, self.max_new_tokens = max_batch, batch_window_s, max_new_tokens
        self.autocast = autocast
        self.backend = backend or HF  # generation=hf|static (rlhf_pl.generation)
        self.device = model_device(model)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.stats = WorkerStats()
        self._queue: queue.Queue[Optional[_Request]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._stopping = threading.Event()

    # --- the web side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, messages: Sequence[Message], n: int = 1, max_new_tokens: Optional[int] = None) -> Stream:
        """Queue ``n`` samples of the answer to ``messages`` (ending with a user turn); call on the event loop."""
        if not 1 <= n <= self.max_batch:
            raise GenerationError(f"n={n}: between 1 and the worker's batch size {self.max_batch} samples a request")
        budget = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        try:
            prompt_ids = tokenize_prompt(self.tokenizer, list(messages))
        except ValueError as err:
            raise GenerationError(str(err)) from None
        stream = Stream(asyncio.get_running_loop(), n)
        self._queue.put(_Request(prompt_ids, n, budget, stream))
        return stream

    # --- the worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                return
            batch = self._gather(first)
            live = [r for r in batch if not r.stream.cancelled.is_set()]
            self.stats.cancelled += len(batch) - len(live)  # closed before their turn came
            try:
                self._generate(live)
            except Exception as err:  # a failed batch fails its requests, never the worker
                log.exception("generation failed for %d request(s)", len(batch))
                for request in batch:
                    request.stream.put({"error": f"generation failed: {type(err).__name__}: {err}"})
            finally:
                for request in batch:
                    request.stream.finished.set()
                    request.stream.put(_END)

    def _gather(self, first: _Request) -> list[_Request]:
        """``first`` and the requests that arrive within the batch window, up to ``max_batch`` rows."""
        batch, rows = [first], first.n
        deadline = time.monotonic() + self.batch_window_s
        while rows < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:  # stop after this batch
                self._stopping.set()
                break
            if rows + nxt.n > self.max_batch:
                self._queue.put(nxt)  # next batch (order among later requests is kept by the FIFO)
                break
            batch.append(nxt)
            rows += nxt.n
        return batch

    def _decode(self, tokens: list[int]) -> str:
        return storable(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _generate(self, batch: list[_Request]) -> None:
        if not batch:
            return
        rows = [_Row(request, j) for request in batch for j in range(request.n)]
        ids, mask = pad_left([r.request.prompt_ids for r in rows], self.tokenizer.pad_token_id)  # (b, p)
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(rows))
        eos = self.tokenizer.eos_token_id

        def on_token(tokens: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
            stop = torch.zeros_like(ended)
            for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if row.ended:
                    stop[i] = True
                    continue
                if row.request.stream.cancelled.is_set():
                    row.ended, stop[i] = True, True
                    continue
                self.stats.tokens += 1
                if token == eos:
                    row.ended = True
                    continue
                row.tokens.append(token)
                text = self._decode(row.tokens)
                if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its rest
                    delta, row.text = text[len(row.text):], text
                    if delta:
                        row.request.stream.put({"row": row.index, "text": delta})
                if len(row.tokens) >= row.request.max_new_tokens:
                    row.ended, stop[i] = True, True
            return stop

        with self.autocast():
            self.backend.generate(self.model, ids.to(self.device), mask.to(self.device), self.sampler,
                     max(r.max_new_tokens for r in batch), eos, self.tokenizer.pad_token_id, self.generator,
                     on_token=on_token)
        for request in batch:
            if request.stream.cancelled.is_set():
                self.stats.cancelled += 1
                continue
            own = [r for r in rows if r.request is request]
            texts = [self._decode(r.tokens).strip() for r in own]
            request.stream.put({"done": True, "texts": texts,
                                "ended": [len(r.tokens) < request.max_new_tokens for r in own]})
