"""Policy registry: name -> policy instance. Every compared policy runs on the same core."""

from __future__ import annotations

from collections.abc import Callable

from tokencake.scheduler.policy import Policy, VLLMPolicy

_REGISTRY: dict[str, Callable[[], Policy]] = {"vllm": VLLMPolicy}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    _REGISTRY[name] = factory


def make_policy(name: str) -> Policy:
    """Instantiate the named policy; unknown names raise a ValueError listing the choices."""
    if name not in _REGISTRY:
        raise ValueError(
            f"policy {name!r} is not available; choose one of {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]()


def _register_agent_policies() -> None:
    """The agent-aware policies (issue #5); imported lazily to keep this module light."""
    from tokencake.scheduler import tokencake_policy as tp
    from tokencake.scheduler.vllm_offload import VLLMOffloadPolicy

    register_policy(VLLMOffloadPolicy.name, VLLMOffloadPolicy)
    from tokencake.scheduler.ablations import ABLATIONS, ablation_config

    for suffix in ABLATIONS:

        def make(suffix: str = suffix) -> Policy:
            p = tp.TokencakePolicy(ablation_config(suffix))
            p.name = f"tokencake-{suffix}"
            return p

        register_policy(f"tokencake-{suffix}", make)
    for cls in (tp.TokencakePolicy, tp.TokencakeSpacePolicy, tp.TokencakeTimePolicy,
                tp.TokencakeAppFCFSPolicy, tp.InferCeptPolicy, tp.ContinuumPolicy):  # fmt: skip
        register_policy(cls.name, cls)


_register_agent_policies()
