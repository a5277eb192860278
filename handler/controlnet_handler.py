"""TorchServe handler for ControlNet canny, scheduled per denoising step on TorchServe's continuous batching.

TorchServe (model-config.yaml `continuousBatching: true`) calls `handle` with every request the worker holds plus
the new ones, over and over. Each call admits the new requests (parse, preprocess, text and hint encoding), drops
those TorchServe no longer sends (their client closed a stream) or that a cancel names, advances every held
request by one denoising step (requests of equal forward key share one model evaluation, whatever their step),
and answers the finished ones. A held request is answered nothing in between: a streamed one gets its progress
event (`ts_stream_next` keeps it in TorchServe's batch); a non-streamed one is left out of the response, so
TorchServe keeps it in the batch and its client gets one whole body at the end.

The model math is in `controlnet_canny`, the request and response formats in `serving` (unit-tested without a
server); this module binds them to TorchServe's context: per-request status and headers, streams, metrics.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from http import HTTPStatus
from pathlib import Path

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.service import Service

import serving
from controlnet_canny.params import ParamError
from controlnet_canny.pipeline import ControlNetCannyPipeline, Finished
from serving import Held

logger = logging.getLogger(__name__)
WORKER_CHECK_SECONDS = 1.0  # how often the live worker count (and so the thread count) is re-read


def _count(metrics, name: str, value: float, **dimensions: str) -> None:
    metrics.add_metric(name, value, "Count", dimensions=[Dimension(k, v) for k, v in dimensions.items()],
                       metric_type=MetricTypes.COUNTER)


def _observe_seconds(metrics, phase: str, seconds: float) -> None:
    metrics.add_metric("ControlNetPhaseSeconds", seconds, "Seconds", dimensions=[Dimension("Phase", phase)],
                       metric_type=MetricTypes.HISTOGRAM)


def _error(metrics, reason: str) -> None:
    _count(metrics, "ControlNetErrors", 1, Reason=reason)


def keep_repeated_fields() -> None:
    """Makes this worker's TorchServe hand a field a form repeats (`-F loras=a:1 -F loras=b:0.5`) over as the list
    of its values instead of its last one (serving.keeping_repeated_fields); once per process."""
    retrieve = Service.retrieve_data_for_inference
    if not getattr(retrieve, "keeps_repeated_fields", False):
        Service.retrieve_data_for_inference = staticmethod(serving.keeping_repeated_fields(retrieve))


class ControlNetHandler:
    """One instance per worker: TorchServe calls `initialize` once, then `handle` for each step of the batch."""

    def initialize(self, context) -> None:
        try:
            self._initialize(context)
        except (ValueError, OSError) as err:  # CheckpointError and configuration mistakes: messages name the file
            # One line per attempt, not a traceback: TorchServe restarts a worker that fails to load (with back-off),
            # and logs a traceback for every exception that reaches it. SystemExit is not an Exception: the worker
            # exits with status 1 and TorchServe retries; /ping turns Unhealthy after maxRetryTimeoutInSec.
            logger.error("model %s cannot be loaded: %s", context.model_name, err)
            raise SystemExit(1) from None

    def _initialize(self, context) -> None:
        keep_repeated_fields()
        model_dir = Path(context.system_properties["model_dir"])
        model_yaml = context.model_yaml_config or {}
        self.config = serving.ServingConfig.from_mapping(model_yaml.get("handler") or {})
        self.max_workers = int(model_yaml.get("maxWorkers", 1))
        self.threads_checked = 0.0
        self._follow_workers()
        gpu_id = context.system_properties.get("gpu_id")
        if self.config.device != "auto":
            device = self.config.device
        elif gpu_id is not None and torch.cuda.is_available():
            device = f"cuda:{gpu_id}"  # the GPU TorchServe assigned to this worker
        else:
            device = None  # the pipeline's choice
        self.pipeline = ControlNetCannyPipeline.load(
            [model_dir / name for name in self.config.checkpoints], model_dir / self.config.model_config,
            device, self.config.precision, self.config.backend,
        )
        if self.config.adapters:  # relative to the model directory, or absolute (a mounted volume)
            self.pipeline.attach_adapters(model_dir / self.config.adapters, self.config.max_adapter_bytes)
        self.model_info = {
            "model": context.model_name,
            "model_version": (context.manifest or {}).get("model", {}).get("modelVersion"),
            "checkpoints": list(self.config.checkpoints),
            "config": self.config.model_config,
            "precision": self.pipeline.precision,
            "device": str(self.pipeline.device),
        }
        # TorchServe's workers of one instance are children of its frontend: they share this directory
        self.cancels = serving.CancelBoard(
            Path(tempfile.gettempdir()) / f"controlnet-cancel-{os.getppid()}-{context.model_name}")
        self.held: dict[str, Held] = {}  # by TorchServe's request id
        self.evaluating: tuple = ()  # what the last step evaluated, to log changes only
        logger.info("loaded %s on %s with %d threads; backend %s", self.model_info, self.pipeline.device,
                    torch.get_num_threads(), self.pipeline.backend.summary())

    def _follow_workers(self) -> None:
        """Threads follow the live worker count, so that workers x threads never exceeds the cores as workers are
        scaled (a worker re-reads the count at most every WORKER_CHECK_SECONDS, before computing)."""
        now = time.monotonic()
        if now - self.threads_checked < WORKER_CHECK_SECONDS:
            return
        self.threads_checked = now
        self.workers = serving.live_workers(self.max_workers)
        threads = self.config.worker_threads(self.workers)
        if threads != torch.get_num_threads():
            logger.info("threads %d (%d live worker(s))", threads, self.workers)
            torch.set_num_threads(threads)

    def handle(self, data: list[dict], context) -> list[bytes]:
        self._follow_workers()
        ids = dict(context.request_ids)  # index -> TorchServe's request id; entries are removed below
        index_of = {request_id: index for index, request_id in ids.items()}
        gone = [r for r in self.held if r not in index_of]  # TorchServe stops sending a stream whose client went
        answers: dict[int, serving.Response] = {}
        requests: dict[int, serving.ServingRequest] = {}  # new requests that parsed
        for index, row in enumerate(data):
            if ids[index] not in self.held:
                answer = self._admit(index, row, context, requests)
                if answer is not None:
                    answers[index] = answer
        for request_id in gone:
            self._stop(context, request_id)
        ended: dict[str, Held] = {}  # held requests answered in this call
        while True:
            for request_id, held in list(self.held.items()):
                if self._stop(context, request_id, only_cancelled=True):
                    ended[request_id] = held
                    answers[index_of[request_id]] = serving.cancelled_response(held.request.request_id)
            for request_id, answer in self._advance(context, ended).items():
                answers[index_of[request_id]] = answer
            # With more than one worker, TorchServe 0.12 sends a worker its next step only once every idle worker
            # of the model has work (an idle one waits for a request holding the model's queue lock), so a worker
            # that is not alone runs its requests to the end in this call (docs/serving.md, "Scheduling").
            if self.workers == 1 or not self.held:
                break
        if not self.held:
            self.pipeline.backend.idle()

        bodies = []
        stream_next: dict[int, bool | None] = {}  # TorchServe's ts_stream_next per response: None for a whole body
        for index in range(len(data)):
            request_id = ids[index]
            if index in answers:
                held = ended.get(request_id)
                request = held.request if held is not None else requests.get(index)
                bodies.append(self._reply(context, index, request, answers[index], held))
                stream_next[index] = False if held is not None and held.events_sent else None
            elif self.held[request_id].request.stream:
                bodies.append(self._progress(context, index, self.held[request_id]))
                stream_next[index] = True
            else:  # held, not streamed: no response now, so TorchServe keeps it in the batch
                del context.request_ids[index]
                bodies.append(b"")
        # TorchServe sets ts_stream_next from these as it encodes the responses: "true" keeps a stream in the batch
        context.stopping_criteria = {index: (lambda _, more=more: None if more is None else not more)
                                     for index, more in stream_next.items()}
        return bodies

    def _stop(self, context, request_id: str, only_cancelled: bool = False) -> bool:
        """Stops a held request that a cancel names (or, unless `only_cancelled`, whose client has gone)."""
        held = self.held[request_id]
        cancelled = held.request.request_id is not None and self.cancels.take(held.request.request_id)
        if not cancelled and only_cancelled:
            return False
        del self.held[request_id]
        if cancelled:
            logger.info("request %s (request_id %s) cancelled", request_id, held.request.request_id)
        else:
            logger.info("request %s dropped: its client closed the connection", request_id)
        _count(context.metrics, "ControlNetRequestsStopped", 1, Reason="cancelled" if cancelled else "client_gone")
        return True

    def _admit(self, index: int, row, context, requests: dict) -> serving.Response | None:
        """A new request: answered at once (a refusal, an edge map, a cancel call) or held for sampling."""
        start = time.perf_counter()
        try:
            request = serving.parse_request(row, context.get_all_request_header(index), self.config)
            if isinstance(request, serving.CancelRequest):
                self.cancels.post(request.request_id)
                logger.info("cancel requested for request_id %s", request.request_id)
                return serving.cancel_accepted_response(request.request_id)
            if isinstance(request, serving.AdaptersRequest):
                store = self.pipeline.adapters
                return serving.adapters_response(None if store is None else store.listing())
            requests[index] = request
            if request.request_id is not None:
                if self.cancels.take(request.request_id):  # cancelled before it reached a worker
                    return serving.cancelled_response(request.request_id)
                if any(h.request.request_id == request.request_id for h in self.held.values()):
                    raise serving.Conflict("request_id", "is the request_id of a request in flight")
            prepared = self.pipeline.prepare(request.image, request.params, request.control_image,
                                             request.init_image)
            _observe_seconds(context.metrics, "preprocess", time.perf_counter() - start)
            if request.mode == "edges":
                return self._encode(index, request, prepared, None, context)
            sampling = self.pipeline.start(prepared, request.preview_every)
        except ParamError as err:
            _error(context.metrics, serving.error_reason(err.field))
            return serving.param_error_response(err)
        except Exception:  # a bug must cost this request only, not the others of the batch
            logger.exception("request %s could not be prepared", context.get_request_id(index))
            _error(context.metrics, "internal")
            return serving.error_response(500, "internal error; the model log has the details", None)
        self.held[context.get_request_id(index)] = Held(request, sampling)
        height, width = prepared.edge_map.shape[:2]
        logger.info("request %s admitted: %dx%d, %d sample(s), %d steps, request_id %s", context.get_request_id(index),
                    width, height, sampling.samples, sampling.total, request.request_id)
        return None

    def _advance(self, context, ended: dict[str, Held]) -> dict[str, serving.Response]:
        """One step of every held request (those of equal forward key in one model evaluation each); answers
        for those that finished, or failed (moved from `held` to `ended`)."""
        owners = {id(h.sampling): r for r, h in self.held.items()}
        groups = self.pipeline.groups([h.sampling for h in self.held.values()], self.config.max_batch_samples)
        evaluating = tuple((len(g), sum(s.samples for s in g)) for g in groups)
        if evaluating != self.evaluating:
            logger.info("evaluating %d request(s) in %d evaluation(s) of %s sample(s)", len(owners), len(groups),
                        "+".join(str(samples) for _, samples in evaluating) or "0")
            self.evaluating = evaluating
        answers = {}
        for group in groups:
            guidance = "full" if group[0].guided_steps[group[0].done] else "conditional"
            try:
                self.pipeline.step(group)
            except Exception:  # one failing evaluation must not fail the other groups
                failed = [owners[id(s)] for s in group]
                logger.exception("a step failed for requests %s", failed)
                _error(context.metrics, "internal")
                for request_id in failed:
                    ended[request_id] = self.held.pop(request_id)
                    answers[request_id] = serving.error_response(500, "generation failed; the model log has the details",
                                                                  None)
            else:
                _count(context.metrics, "ControlNetDenoisingSteps", 1, Guidance=guidance)
        self.pipeline.backend.synchronize()  # a progress event means that step has run, not that it was queued
        done = [r for r, h in self.held.items() if h.sampling.finished]
        if not done:
            return answers
        held = [self.held.pop(r) for r in done]
        ended.update(zip(done, held))
        try:
            results = self.pipeline.finish([h.sampling for h in held])
        except Exception:
            logger.exception("decoding failed for requests %s", done)
            _error(context.metrics, "internal")
            return {**answers, **{r: serving.error_response(500, "decoding failed; the model log has the details", None)
                                  for r in done}}
        for request_id, h, result in zip(done, held, results):
            logger.info("request %s done: %d image(s), %d steps, threads %d (%d live worker(s)), seconds %s", request_id,
                        len(result.images), result.steps, torch.get_num_threads(), self.workers,
                        {phase: round(s, 3) for phase, s in result.seconds.items()})
            self._record(context, result)
            answers[request_id] = self._encode(None, h.request, h.sampling.prepared, result, context)
        return answers

    @staticmethod
    def _record(context, result: Finished) -> None:
        _count(context.metrics, "ControlNetImagesGenerated", len(result.images))
        for phase, seconds in result.seconds.items():
            _observe_seconds(context.metrics, phase, seconds)
        for score in result.control_fidelity:
            context.metrics.add_metric("ControlNetControlFidelity", 100 * score, "Percent", dimensions=[],
                                       metric_type=MetricTypes.HISTOGRAM)

    def _encode(self, index: int | None, request, prepared, result: Finished | None, context) -> serving.Response:
        """The response of one request; a failure to encode it costs that request only."""
        try:
            parameters = serving.effective_parameters(
                prepared, self.model_info, result and result.steps, request.digests, result and result.control_fidelity)
            return serving.encode_result(request, prepared, result and result.images, parameters)
        except Exception:
            logger.exception("the response to a request could not be encoded (%s)",
                             context.get_request_id(index) if index is not None else "finished")
            _error(context.metrics, "internal")
            return serving.error_response(500, "internal error; the model log has the details", None)

    def _progress(self, context, index: int, held: Held) -> bytes:
        """A streamed request's event for the step just run; `ts_stream_next` keeps it in TorchServe's batch."""
        if held.events_sent == 0:
            context.set_response_status(200, "OK", index)
            context.set_response_content_type(index, serving.STREAM_TYPE)
            context.set_response_header(index, "X-Seeds", ",".join(map(str, held.sampling.prepared.seeds)))
        held.events_sent += 1
        started = time.perf_counter()
        preview = self.pipeline.preview(held.sampling)
        jpeg = serving.encode_preview(preview) if preview is not None else None
        if jpeg is not None:
            _observe_seconds(context.metrics, "preview", time.perf_counter() - started)
        return serving.progress_event(held.sampling.done, held.sampling.total, jpeg)

    def _reply(self, context, index: int, request: serving.ServingRequest | None, response: serving.Response,
               held: Held | None) -> bytes:
        """A request's last response: a whole body, or a stream's last chunk (an error ends a stream that has
        begun with an error event; its HTTP status went out with its first event), after the progress events of
        the steps it has not reported yet."""
        context.set_response_status(response.status, HTTPStatus(response.status).phrase, index)
        for name, value in response.headers.items():
            context.set_response_header(index, name, value)
        if request is None or not request.stream:
            context.set_response_content_type(index, response.content_type)
            return response.body
        context.set_response_content_type(index, serving.STREAM_TYPE)
        unsent = range(held.events_sent + 1, held.sampling.done + 1) if held is not None else ()
        return b"".join(serving.progress_event(step, held.sampling.total) for step in unsent) + \
            serving.stream_final_line(response)
