"""Policy registry: name -> factory. Every compared policy runs on the same core.

A factory takes the :class:`~tokencake.scheduler.policy.PolicyContext` the scheduler builds
(a policy class itself is one). The registry is the single list of policy names: the engine
config, the CLI and the benchmark all validate against :func:`policy_names`.
"""

from __future__ import annotations

from tokencake.scheduler.policy import Policy, PolicyContext, PolicyFactory, VLLMPolicy

_REGISTRY: dict[str, PolicyFactory] = {"vllm": VLLMPolicy}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make ``factory`` available as ``name`` (to ``EngineConfig.policy``, the CLI, bench)."""
    _REGISTRY[name] = factory


def policy_names() -> tuple[str, ...]:
    """Registered policy names, in registration order."""
    return tuple(_REGISTRY)


def policy_factory(name: str) -> PolicyFactory:
    """The factory registered as ``name``; unknown names raise a ValueError listing the
    choices."""
    if name not in _REGISTRY:
        raise ValueError(
            f"policy {name!r} is not available; choose one of {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    """Instantiate the named policy on ``ctx``."""
    return policy_factory(name)(ctx)


def _register_agent_policies() -> None:
    """The agent-aware policies (issue #5); imported lazily to keep this module light."""
    from tokencake.scheduler import tokencake_policy as tp
    from tokencake.scheduler.vllm_offload import VLLMOffloadPolicy

    register_policy(VLLMOffloadPolicy.name, VLLMOffloadPolicy)
    for cls in (tp.TokencakePolicy, tp.TokencakeSpacePolicy, tp.TokencakeTimePolicy,
                tp.TokencakeAppFCFSPolicy, tp.InferCeptPolicy, tp.ContinuumPolicy):  # fmt: skip
        register_policy(cls.name, cls)
    from tokencake.scheduler.ablations import ABLATIONS, ablation_policy

    for suffix in ABLATIONS:  # tokencake with one mechanism changed (bench/RESULTS.md)
        register_policy(f"tokencake-{suffix}", ablation_policy(suffix))


_register_agent_policies()
