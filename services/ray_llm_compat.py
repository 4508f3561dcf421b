"""The private Ray Serve LLM names rayft's serving uses, in one place, for the Ray versions
in `rollout.stack.SUPPORTED["ray"]` (checked when this module is imported; Ray Serve LLM
ships inside the `ray` wheel). Importing it imports vLLM, so Ray's core private names
live apart, in services.ray_compat.

Two of Ray Serve LLM's classes are extended through private hooks; `IngressBase` and
`ServerBase` turn those hooks into methods of rayft's own names, so the subclasses in
services.ingress and services.engine use no private name, and a Ray whose hooks moved
fails here, at import, rather than serving without rayft's checks.
"""

from __future__ import annotations

from rollout.stack import SUPPORTED, UnsupportedVersion, require

require("ray")

from ray.llm._internal.common.callbacks.base import CallbackBase  # noqa: E402
from ray.llm._internal.common.models import global_id_manager  # noqa: E402
from ray.llm._internal.common.utils.lora_utils import get_lora_id  # noqa: E402
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig  # noqa: E402
from ray.llm._internal.serve.core.configs.openai_api_models import (  # noqa: E402
    ModelCard, ModelList, OpenAIHTTPException, to_model_metadata)
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS  # noqa: E402
from ray.llm._internal.serve.core.ingress.middleware import SetRequestIdMiddleware  # noqa: E402
from ray.llm._internal.serve.observability.metrics.fast_api_metrics import metrics_lifespan  # noqa: E402
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader  # noqa: E402
from ray.serve.llm import LLMServer  # noqa: E402
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress  # noqa: E402

__all__ = ["DEFAULT_ENDPOINTS", "DiskMultiplexConfig", "IngressBase", "LocalModelCallback", "LoraModelLoader", "ModelCard", "ModelList",
           "OpenAIHTTPException", "ServerBase", "SetRequestIdMiddleware", "get_lora_id", "global_id_manager",
           "make_fastapi_ingress", "metrics_lifespan", "to_model_metadata"]

_HOOKS = {OpenAiIngress: ("_get_model_id", "_process_llm_request"),
          LLMServer: ("_maybe_resolve_lora_from_multiplex",)}
for _cls, _names in _HOOKS.items():
    _missing = [name for name in _names if not callable(getattr(_cls, name, None))]
    if _missing:
        raise UnsupportedVersion(f"this Ray's {_cls.__name__} has no {', '.join(_missing)}, which rayft's serving "
                                 f"extends; rayft supports ray{SUPPORTED['ray']}")


class IngressBase(OpenAiIngress):
    """OpenAiIngress with its private hooks as overridable methods."""

    def served_model_id(self, model: str) -> str:
        """The model a request names, once the stock ingress resolved it; raise to refuse it."""
        return model

    def request_error(self, exc: Exception) -> Exception | None:
        """The error to raise instead of `exc` from a forwarded request; None keeps `exc`."""
        return None

    @property
    def model_cards(self) -> dict[str, ModelCard]:
        return self._model_cards

    @property
    def engine_handles(self) -> dict:
        """Base model id -> the handle of its engine deployment."""
        return self._default_serve_handles

    async def _get_model_id(self, model):
        return self.served_model_id(await super()._get_model_id(model))

    async def _process_llm_request(self, body, call_method: str, raw_request=None):
        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except Exception as exc:
            replacement = self.request_error(exc)
            if replacement is None:
                raise
            raise replacement from exc


class ServerBase(LLMServer):
    """LLMServer with the load of a request's adapter as an overridable method."""

    async def resolve_adapter(self, load) -> None:
        """Load the request's adapter, if any: `await load()` does it."""
        await load()

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        await self.resolve_adapter(super()._maybe_resolve_lora_from_multiplex)


class LocalModelCallback(CallbackBase):
    """Skips Ray Serve LLM's node initialisation, a task per node that "downloads" the
    model: rayft serves local directories only (checked before deploying), which every
    node must see, so the task only cost an extra vLLM-importing process per engine start.
    services.app names it by its path in `LLMConfig.callback_config`."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
