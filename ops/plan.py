"""GPU memory planning from the registry alone, before anything is loaded.

A model on a GPU needs its weights plus one full batch of activations: weights_gb +
max_batch_tokens * activation_kb_per_token must fit its memory_budget_gb, and the budgets of the models
loaded together must fit the card. The same arithmetic backs `rerank-gateway plan` and the test that
every shipped profile fits its card; at load time the model pool checks the measured figures instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.budgets import usable_gb
from core.config import LocalModelSpec, Registry, effective

GIB = 1024**3
KIB = 1024


@dataclass(frozen=True)
class ModelPlan:
    model_id: str
    backend: str
    load: str
    profile: str
    device: str
    dtype: str
    quantization: str
    max_length: int
    max_batch_tokens: int
    weights_gb: float | None
    activation_kb_per_token: float | None
    budget_gb: float | None

    @property
    def known(self) -> bool:
        return self.weights_gb is not None and self.activation_kb_per_token is not None

    @property
    def batch_gb(self) -> float | None:
        """Activations of one full batch."""
        if self.activation_kb_per_token is None:
            return None
        return self.max_batch_tokens * self.activation_kb_per_token * KIB / GIB

    @property
    def need_gb(self) -> float | None:
        if not self.known:
            return None
        return self.weights_gb + self.batch_gb  # type: ignore[operator]

    @property
    def budget_batch_tokens(self) -> int | None:
        """The largest batch, in tokens, the budget holds beside the weights."""
        if not self.known or self.budget_gb is None or not self.activation_kb_per_token:
            return None
        return max(0, int((self.budget_gb - self.weights_gb) * GIB / (self.activation_kb_per_token * KIB)))

    @property
    def fits(self) -> bool | None:
        """True / False when the figures decide it, None when one is missing or the model is on the CPU
        (budgets bound GPU memory only, as at load time)."""
        if self.device != "cuda" or self.need_gb is None or self.budget_gb is None:
            return None
        return self.need_gb <= self.budget_gb


@dataclass
class CardPlan:
    gpu_type: str
    memory_gb: float | None  # None for the CPU or an unknown GPU
    models: list[ModelPlan]
    problems: list[str] = field(default_factory=list)

    @property
    def usable_gb(self) -> float | None:
        return None if self.memory_gb is None else usable_gb(self.memory_gb)

    def budgets_gb(self, *, loads: tuple[str, ...]) -> float:
        return sum(m.budget_gb or 0.0 for m in self.models if m.device == "cuda" and m.load in loads)

    @property
    def ok(self) -> bool:
        return not self.problems


def plan(registry: Registry, gpu_type: str) -> CardPlan:
    gpu = registry.gpu_types.get(gpu_type)
    models: list[ModelPlan] = []
    for model_id, spec in registry.models.items():
        if not isinstance(spec, LocalModelSpec):
            continue  # a remote model holds no memory here
        eff = effective(spec, gpu_type)
        models.append(
            ModelPlan(
                model_id=model_id, backend=spec.backend, load=spec.load, profile=eff.profile, device=eff.device,
                dtype=eff.dtype, quantization=eff.quantization, max_length=eff.max_length,
                max_batch_tokens=eff.max_batch_tokens, weights_gb=spec.weights_gb,
                activation_kb_per_token=spec.activation_kb_per_token, budget_gb=eff.memory_budget_gb,
            )
        )
    card = CardPlan(gpu_type=gpu_type, memory_gb=gpu.memory_gb if gpu else None, models=models)
    for m in models:
        if m.load == "off":
            continue
        if m.max_batch_tokens < m.max_length:
            card.problems.append(
                f"{m.model_id}: max_batch_tokens {m.max_batch_tokens} < max_length {m.max_length}: "
                "a full-length pair is wider than a batch"
            )
        if m.fits is False:
            card.problems.append(
                f"{m.model_id}: weights {m.weights_gb:g} GB + {m.max_batch_tokens} tokens x "
                f"{m.activation_kb_per_token:g} KB = {m.need_gb:.2f} GB > budget {m.budget_gb:g} GB"
            )
    if card.usable_gb is not None:
        for label, loads in (("eager", ("eager",)), ("eager + lazy", ("eager", "lazy"))):
            total = card.budgets_gb(loads=loads)
            if total > card.usable_gb:
                card.problems.append(
                    f"{label} models' budgets {total:g} GB > {card.usable_gb:.1f} GB usable on {gpu_type}"
                )
    return card


def render(card: CardPlan) -> str:
    """The table `rerank-gateway plan` prints."""

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = (
        f"{'model':30} {'backend':9} {'load':5} {'profile':10} {'device':6} {'dtype':9} {'quant':5} "
        f"{'max_len':>7} {'batch_tok':>9} {'weights_gb':>10} {'act_kb/tok':>10} {'batch_gb':>8} "
        f"{'need_gb':>7} {'budget_gb':>9} {'budget_tok':>10} {'fits':>4}"
    )
    lines = [header]
    for m in card.models:
        fits = {True: "yes", False: "NO", None: "?"}[m.fits]
        lines.append(
            f"{m.model_id:30} {m.backend:9} {m.load:5} {m.profile:10} {m.device:6} {m.dtype:9} {m.quantization:5} "
            f"{m.max_length:>7} {m.max_batch_tokens:>9} {num(m.weights_gb, '.2f'):>10} "
            f"{num(m.activation_kb_per_token, '.0f'):>10} {num(m.batch_gb, '.2f'):>8} {num(m.need_gb, '.2f'):>7} "
            f"{num(m.budget_gb, 'g'):>9} {num(m.budget_batch_tokens, 'd'):>10} {fits:>4}"
        )
    if card.usable_gb is not None:
        for label, loads in (("eager models", ("eager",)), ("eager + lazy models", ("eager", "lazy"))):
            total = card.budgets_gb(loads=loads)
            verdict = "fit" if total <= card.usable_gb else "DO NOT FIT"
            lines.append(
                f"{label}: budgets {total:g} GB of {card.usable_gb:.1f} GB usable "
                f"({card.memory_gb:g} GB card): {verdict}"
            )
    else:
        lines.append("no GPU memory to plan for on this profile (budgets apply to CUDA models only)")
    lines.extend(f"problem: {p}" for p in card.problems)
    return "\n".join(lines)
