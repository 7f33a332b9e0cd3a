"""Mixed traffic: agent applications sharing the engine with plain chat requests.

The starvation check of issue 12: a scheduler that favours annotated agent calls must not
starve ordinary traffic. :func:`mixed` builds one of the agent generators' workloads and
adds single-call chat "applications" arriving as a Poisson process over the same horizon.
Each chat application is marked in ``Application.metadata["traffic"]``:

* ``"chat-plain"`` — the driver sends **no metadata** at all (an ordinary OpenAI client);
* ``"chat-annotated"`` — the driver sends the graph-derived metadata of a one-node
  application (depth 1, no successors, no tool), as a metadata-aware client would for a
  one-shot call.

Chat prompts and outputs follow published chat-serving statistics (ShareGPT-like: prompt
log-normal with median 800 tokens, output median 250 tokens, both clipped), so a chat call
is small next to an agent's ~9k-token context.
"""

from __future__ import annotations

import math

import numpy as np

from bench.workload import Application, Node, Workload

#: ``Application.metadata["traffic"]`` values of the chat requests.
CHAT_PLAIN = "chat-plain"
CHAT_ANNOTATED = "chat-annotated"


def traffic_of(app: Application) -> str:
    """``"agent"`` unless the application is one of :func:`mixed`'s chat requests."""
    return str(app.metadata.get("traffic", "agent"))


def mixed(
    agent: str = "code_writer",
    num_apps: int = 16,
    arrival_rate: float = 1.0,
    chat_per_app: float = 4.0,
    plain_fraction: float = 0.5,
    seed: int = 0,
    context_scale: float = 1.0,
    output_scale: float = 1.0,
    **agent_params: object,
) -> Workload:
    """``num_apps`` applications of generator ``agent`` plus ``chat_per_app * num_apps``
    chat calls (Poisson at ``chat_per_app * arrival_rate`` per second from ``t = 0``);
    ``plain_fraction`` of them carry no metadata."""
    from bench.generators import make_workload

    if not (chat_per_app >= 0 and math.isfinite(chat_per_app)):
        raise ValueError(f"chat_per_app must be finite and >= 0, got {chat_per_app!r}")
    if not 0.0 <= plain_fraction <= 1.0:
        raise ValueError(f"plain_fraction must be in [0, 1], got {plain_fraction!r}")
    base = make_workload(
        agent, num_apps=num_apps, arrival_rate=arrival_rate, seed=seed,
        context_scale=context_scale, output_scale=output_scale, **agent_params,
    )  # fmt: skip
    n_chat = round(chat_per_app * num_apps)
    rng = np.random.default_rng([seed, 7])
    t = 0.0
    chats = []
    for i in range(n_chat):
        if i:
            t += float(rng.exponential(1.0 / (chat_per_app * arrival_rate)))
        prompt = min(4000.0, max(32.0, 800.0 * math.exp(0.8 * rng.standard_normal())))
        out = min(1024.0, max(16.0, 250.0 * math.exp(0.7 * rng.standard_normal())))
        kind = CHAT_PLAIN if rng.random() < plain_fraction else CHAT_ANNOTATED
        node = Node(
            id="chat", agent_type="chat", importance=1.0,
            prompt_tokens=max(1, round(prompt * context_scale)),
            max_tokens=max(1, round(out * output_scale)),
        )  # fmt: skip
        chats.append(Application(f"chat{i}", t, (node,), metadata={"traffic": kind}))
    return Workload(
        name=f"mixed_{base.name}",
        seed=seed,
        description=f"{base.description}; plus {n_chat} chat calls ({plain_fraction:.0%} plain)",
        applications=tuple(sorted((*base.applications, *chats), key=lambda a: a.arrival_s)),
        metadata={
            "generator_params": {
                "agent": agent,
                "num_apps": num_apps,
                "arrival_rate": arrival_rate,
                "chat_per_app": chat_per_app,
                "plain_fraction": plain_fraction,
                "context_scale": context_scale,
                "output_scale": output_scale,
            }
        },  # fmt: skip
    )
