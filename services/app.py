"""The Ray Serve application for a served model: one Ray Serve LLM engine deployment
(vLLM) for the base model with its LoRA adapters multiplexed over it (services.engine),
and rayft's ingress in front (services.ingress).

`build_app(cfg)` is what `rayft serve` deploys; `app_builder(args)` is the same for
`serve run` and RayService manifests (`import_path: services.app:app_builder`, the
serve config's keys as `args`).

Placement: on CPU every replica is one bundle of `cpus_per_replica` CPUs (Ray Serve LLM
asks for a GPU unless told otherwise); on GPU each replica takes `tensor_parallel_size`
GPUs and vLLM shards the model across them.
"""

from __future__ import annotations

import dataclasses
import functools

import ray
from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment

from rollout.engine import vllm_device_kwargs
from services.auth import key_digest
from services.config import API_KEY_ENV, ServeConfig, ServeConfigError
from services.ingress import ingress_class
from services.engine import AdapterServer, LocalAdapterLoader
from services.models import ServedModel, resolve_served

INGRESS_MAX_ONGOING = 100_000  # the ingress only forwards; the engine deployment bounds the work


def build_app(cfg: ServeConfig, served: ServedModel | None = None) -> Application:
    """The application for `cfg` (checked first); `served` when already resolved."""
    cfg.validate()
    served = served or resolve_served(cfg)
    llm_config = engine_config(cfg, served, use_gpu=_use_gpu(cfg))
    server = build_llm_deployment(
        llm_config, name_prefix="LLMServer:", deployment_cls=AdapterServer,
        bind_kwargs={"model_downloader": functools.partial(LocalAdapterLoader, served.adapters)})
    ingress = serve.deployment(ingress_class(key_digest(cfg.resolved_api_key()), cfg.retry_after_s),
                               name="RayftIngress", max_ongoing_requests=INGRESS_MAX_ONGOING,
                               ray_actor_options={"num_cpus": 0})
    card = _model_card(served.model_id, llm_config)
    return ingress.bind(llm_deployments={served.model_id: server}, model_cards={served.model_id: card},
                        adapters={served.model_id: list(served.adapters)})


def app_builder(args: dict) -> Application:
    """Ray Serve's application-builder entry point: `args` holds serve-config keys. A
    deployed application listens beyond loopback, so it must have an API key."""
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ServeConfigError(unknown[0], f"unknown key (valid keys: {', '.join(sorted(names))})")
    cfg = ServeConfig(**args)
    if not cfg.resolved_api_key():
        raise ServeConfigError("api_key", f"a deployed application needs an API key: set ${API_KEY_ENV} "
                                          "(from a Secret) or api_key")
    return build_app(cfg)


def engine_config(cfg: ServeConfig, served: ServedModel, use_gpu: bool) -> LLMConfig:
    engine = dict(trust_remote_code=False, max_model_len=cfg.max_model_len or None)
    if served.adapters:
        engine.update(enable_lora=True, max_lora_rank=served.max_lora_rank, max_loras=cfg.max_loras)
    engine.update(vllm_device_kwargs(use_gpu, cfg.dtype, cfg.kv_cache_gb, cfg.tensor_parallel_size,
                                     cfg.gpu_memory_utilization))
    # Ray Serve LLM asks for a GPU per replica unless given the bundles to place it on.
    placement = None if use_gpu else dict(bundles=[{"CPU": cfg.cpus_per_replica}])
    deployment = dict(max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
                      ray_actor_options={"num_cpus": 0})
    if cfg.autoscaling:
        deployment["autoscaling_config"] = dict(min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
                                                target_ongoing_requests=cfg.target_ongoing_requests)
    else:
        deployment["num_replicas"] = cfg.num_replicas
    config = dict(model_loading_config=dict(model_id=served.model_id, model_source=served.base_dir),
                  engine_kwargs=engine, deployment_config=deployment,
                  # the replica imports it: naming it keeps the private module out of this one
                  callback_config=dict(callback_class="services.ray_llm_compat:LocalModelCallback"))
    if placement:
        config["placement_group_config"] = placement
    if served.adapters:
        config["lora_config"] = dict(max_num_adapters_per_replica=max(len(served.adapters), cfg.max_loras))
    return LLMConfig(**config)


def _use_gpu(cfg: ServeConfig) -> bool:
    if cfg.device != "auto":
        return cfg.device == "cuda"
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _model_card(model_id: str, llm_config: LLMConfig):
    from services.ray_llm_compat import to_model_metadata

    return to_model_metadata(model_id, llm_config)
