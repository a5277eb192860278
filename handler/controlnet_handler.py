"""TorchServe handler for ControlNet canny: parses each request of a batch, samples compatible requests
together, encodes the responses.

The model math is in `controlnet_canny`, the request and response formats in `serving` (unit-tested without
a server); this module binds them to TorchServe's context: per-request status and headers, streamed
progress, metrics.
"""
from __future__ import annotations

import logging
import time
from http import HTTPStatus
from pathlib import Path

import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

import serving
from controlnet_canny.params import ParamError
from controlnet_canny.pipeline import ControlNetCannyPipeline

logger = logging.getLogger(__name__)


def _count(metrics, name: str, value: float, **dimensions: str) -> None:
    metrics.add_metric(name, value, "Count", dimensions=[Dimension(k, v) for k, v in dimensions.items()],
                       metric_type=MetricTypes.COUNTER)


def _observe_seconds(metrics, phase: str, seconds: float) -> None:
    metrics.add_metric("ControlNetPhaseSeconds", seconds, "Seconds", dimensions=[Dimension("Phase", phase)],
                       metric_type=MetricTypes.HISTOGRAM)


def _error(metrics, reason: str) -> None:
    _count(metrics, "ControlNetErrors", 1, Reason=reason)


class ControlNetHandler:
    """One instance per worker: TorchServe calls `initialize` once, then `handle` for each batch."""

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
        model_dir = Path(context.system_properties["model_dir"])
        model_yaml = context.model_yaml_config or {}
        self.config = serving.ServingConfig.from_mapping(model_yaml.get("handler") or {})
        # Every worker is a process of its own: without a cap, each would start one thread per core.
        torch.set_num_threads(self.config.worker_threads(model_yaml.get("maxWorkers", 1)))
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
        self.model_info = {
            "model": context.model_name,
            "model_version": (context.manifest or {}).get("model", {}).get("modelVersion"),
            "checkpoints": list(self.config.checkpoints),
            "config": self.config.model_config,
            "precision": self.pipeline.precision,
            "device": str(self.pipeline.device),
        }
        logger.info("loaded %s on %s with %d threads; backend %s", self.model_info, self.pipeline.device,
                    torch.get_num_threads(), self.pipeline.backend.summary())

    def handle(self, data: list[dict], context) -> list[bytes]:
        requests: dict[int, serving.ServingRequest] = {}
        prepared = {}
        responses: dict[int, serving.Response] = {}
        for index, row in enumerate(data):
            start = time.perf_counter()
            try:
                request = serving.parse_request(row, context.get_all_request_header(index), self.config)
                prepared[index] = self.pipeline.prepare(request.image, request.params, request.control_image,
                                                        request.init_image)
            except ParamError as err:
                responses[index] = serving.param_error_response(err)
                _error(context.metrics, serving.error_reason(err.field))
                continue
            except Exception:  # a bug must cost this request only, not the whole TorchServe batch
                logger.exception("request %s could not be prepared", context.get_request_id(index))
                responses[index] = serving.error_response(500, "internal error; the model log has the details", None)
                _error(context.metrics, "internal")
                continue
            requests[index] = request
            _observe_seconds(context.metrics, "preprocess", time.perf_counter() - start)
            if request.mode == "edges":
                responses[index] = self._encode(index, request, prepared[index], None, None, None, context)

        to_generate = {i: p for i, p in prepared.items() if requests[i].mode == "generate"}
        for group in serving.batch_groups(to_generate, self.config.max_batch_samples):
            responses.update(self._generate(group, requests, prepared, context))
        return [self._reply(context, index, requests.get(index), responses[index]) for index in range(len(data))]

    def _generate(self, group: list[int], requests, prepared, context) -> dict[int, serving.Response]:
        streaming = [i for i in group if requests[i].stream]
        for index in streaming:
            # The first streamed chunk carries the HTTP headers, so they are set before sampling starts.
            context.set_response_content_type(index, serving.STREAM_TYPE)
            context.set_response_header(index, "X-Seeds", ",".join(map(str, prepared[index].seeds)))

        def on_step(done: int, total: int) -> None:
            for index in streaming:
                send_intermediate_predict_response(
                    {index: serving.progress_event(done, total)}, {index: context.get_request_id(index)},
                    "Intermediate Prediction success", 200, context,
                )

        try:
            result = self.pipeline.generate([prepared[i] for i in group], on_step)
        except Exception:  # one failing sampler batch must not fail the other requests of the TorchServe batch
            logger.exception("generation failed for requests %s", [context.get_request_id(i) for i in group])
            _error(context.metrics, "internal")
            return {i: serving.error_response(500, "generation failed; the model log has the details", None) for i in group}
        images = sum(len(samples) for samples in result.images)
        logger.info("sampler batch: %d request(s), %d image(s), %d steps, seconds %s", len(group), images, result.steps,
                    {phase: round(s, 3) for phase, s in result.seconds.items()})
        _count(context.metrics, "ControlNetImagesGenerated", images)
        _count(context.metrics, "ControlNetDenoisingSteps", result.steps)
        for phase, seconds in result.seconds.items():
            _observe_seconds(context.metrics, phase, seconds)
        for score in (score for scores in result.control_fidelity for score in scores):
            context.metrics.add_metric("ControlNetControlFidelity", 100 * score, "Percent", dimensions=[],
                                       metric_type=MetricTypes.HISTOGRAM)
        return {
            index: self._encode(index, requests[index], prepared[index], samples, result.steps, fidelity, context)
            for index, samples, fidelity in zip(group, result.images, result.control_fidelity)
        }

    def _encode(self, index: int, request, prepared, samples, steps: int | None, fidelity, context) -> serving.Response:
        """The response of one request; a failure to encode it costs that request only, not the TorchServe batch."""
        try:
            parameters = serving.effective_parameters(prepared, self.model_info, steps, request.digests, fidelity)
            return serving.encode_result(request, prepared, samples, parameters)
        except Exception:
            logger.exception("the response to request %s could not be encoded", context.get_request_id(index))
            _error(context.metrics, "internal")
            return serving.error_response(500, "internal error; the model log has the details", None)

    @staticmethod
    def _reply(context, index: int, request: serving.ServingRequest | None, response: serving.Response) -> bytes:
        context.set_response_status(response.status, HTTPStatus(response.status).phrase, index)
        for name, value in response.headers.items():
            context.set_response_header(index, name, value)
        if request is not None and request.stream:
            context.set_response_content_type(index, serving.STREAM_TYPE)
            return serving.stream_final_line(response)
        context.set_response_content_type(index, response.content_type)
        return response.body
