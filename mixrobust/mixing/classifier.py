"""`MixedClassifier`: two frozen base classifiers g (accurate) and h (robust) mixed by eq. (3)/(4)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from mixrobust.errors import ConfigError
from mixrobust.mixing.formulas import mix_log_probs, mix_logits
from mixrobust.mixing.gradients import r_values
from mixrobust.mixing.maps import HMap, parse_h_map
from mixrobust.mixing.options import MixSpace, ROption, alphas_from_gammas, check_alphas
from mixrobust.threat import Norm

log = logging.getLogger(__name__)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (autocast) to float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _probe_classes(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> int:
    ref = next(iter(model.parameters()), None)
    ref = next(iter(model.buffers()), None) if ref is None else ref
    device = ref.device if ref is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape, device=device))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{name} does not accept inputs of shape {input_shape}: {err}") from err
    if out.ndim != 2:
        raise ConfigError(
            f"{name} must output (N, K) logits, got shape {tuple(out.shape)} for input {input_shape}"
        )
    return int(out.shape[1])


def check_compatible(
    g: nn.Module, h: nn.Module, input_shape: Sequence[int] | None = None
) -> tuple[int | None, tuple[int, ...] | None]:
    """Check that g and h agree on class count and input shape; returns (num_classes, input_shape).

    Uses the models' ``num_classes`` / ``input_shape`` attributes when present; where one is
    missing and an input shape is known (`input_shape` or either attribute), both models are
    run once on a zero input. Raises ConfigError naming both values on a mismatch.
    """
    attrs = {}
    for name, m in (("g", g), ("h", h)):
        k, s = getattr(m, "num_classes", None), getattr(m, "input_shape", None)
        attrs[name] = (None if k is None else int(k), None if s is None else tuple(int(v) for v in s))
    (gk, gs), (hk, hs) = attrs["g"], attrs["h"]
    if gk is not None and hk is not None and gk != hk:
        raise ConfigError(f"g has {gk} classes but h has {hk}; mix two classifiers of the same label set")
    if gs is not None and hs is not None and gs != hs:
        raise ConfigError(f"g takes inputs of shape {gs} but h takes {hs}; mix classifiers of the same data")
    if input_shape is not None:
        input_shape = tuple(int(v) for v in input_shape)
        for name, s in (("g", gs), ("h", hs)):
            if s is not None and s != input_shape:
                raise ConfigError(f"input_shape={input_shape} was given but {name} takes inputs of shape {s}")
    shape = input_shape or gs or hs
    if None not in (gk, hk, gs, hs):
        return gk, shape
    if shape is None:
        log.info("g and h carry no num_classes/input_shape and no input_shape was given: not checked")
        return gk if gk is not None else hk, None
    gk2, hk2 = _probe_classes("g", g, shape), _probe_classes("h", h, shape)
    if gk2 != hk2:
        raise ConfigError(f"g outputs {gk2} classes but h outputs {hk2} (inputs of shape {shape})")
    return gk2, shape


class MixedClassifier(nn.Module):
    """The mixture of a standard classifier g and a robust classifier h (method.md eqs. (3), (4)).

    ``forward(x)`` takes images in [0,1], (N, C, H, W), and returns (N, K) logits; for a vector
    alpha of A values it returns (A, N, K), one slice per alpha, from a single evaluation of g
    and h (and of R_i). With ``mix_space="prob"`` the output is the log of the mixed
    probabilities (log-probabilities for ``r_option="one"``, eq. (4)), to be used as logits by
    every attack and loss; with ``mix_space="logit"`` it is the mixed logits themselves.

    - alpha = 0 returns log_softmax(g(x)) (prob) or g(x) (logit) exactly, alpha = 1 the same of h.
    - The mixing math runs in float32 (or float64 for float64 models) with autocast disabled.
    - For gradient-based R_i (``norm`` sets the threat norm, R_i uses its dual p*): when x
      requires grad, R_i is differentiated through (double backprop), so an attack sees the
      true gradient of the mixture; ``detach_r=True`` treats R_i as a constant instead
      (ablation, not a sound attack). Without grad (no_grad or inference_mode), R_i is computed
      on a detached copy of x and the output carries no graph.
      Cost: one extra batched backward per class for the per-class options.
    - g and h are frozen: eval mode whatever ``train()`` is called with, no parameter gradients.
    - ``h_map`` maps h's logits before they are mixed (`mixrobust.mixing.maps`: MixedNUTS's nonlinear map,
      applied in float64 and differentiated through by attacks); the default identity is eq. (4) itself.
      alpha = 1 then returns the mapped h (log_softmax of it with prob mixing).
    """

    def __init__(
        self,
        g: nn.Module,
        h: nn.Module,
        alpha: float | Sequence[float] | torch.Tensor = 0.5,
        r_option: ROption | str = "one",
        mix_space: MixSpace | str = "prob",
        norm: Norm | str = "linf",
        detach_r: bool = False,
        input_shape: Sequence[int] | None = None,
        h_map: HMap | str | dict | None = None,
    ):
        super().__init__()
        self.h_map = HMap() if h_map is None else parse_h_map(h_map)
        self.r_option = ROption.parse(r_option)
        self.mix_space = MixSpace.parse(mix_space)
        self.norm = Norm.parse(norm)
        self.detach_r = bool(detach_r)
        self.alpha = alpha
        self.g = _freeze(g)
        self.h = _freeze(h)
        self._num_classes, self._input_shape = check_compatible(g, h, input_shape)
        self.h_map.check_classes(self._num_classes)

    @classmethod
    def from_gamma(
        cls, g: nn.Module, h: nn.Module, gamma: float | Sequence[float] | torch.Tensor, **kwargs
    ) -> "MixedClassifier":
        """Build from the smoothing strength gamma >= 0 of eq. (3): alpha = gamma / (1 + gamma)."""
        return cls(g, h, alpha=alphas_from_gammas(gamma), **kwargs)

    @property
    def alpha(self) -> float | tuple[float, ...]:
        """The mixing weight: a float, or a tuple of floats when a vector was given."""
        return self._alphas if self._is_vector else self._alphas[0]

    @alpha.setter
    def alpha(self, value: float | Sequence[float] | torch.Tensor) -> None:
        self._alphas, self._is_vector = check_alphas(value)

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    def train(self, mode: bool = True) -> "MixedClassifier":
        """Set the mixture's mode; g and h always stay in eval mode."""
        super().train(mode)
        self.g.eval()
        self.h.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, r_option={self.r_option.value}, mix_space={self.mix_space.value}, "
            f"norm={self.norm.value}, detach_r={self.detach_r}"
            + ("" if self.h_map.identity else f", h_map={self.h_map.label}")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gl, hl, r = self._base(x)
        with torch.autocast(x.device.type, enabled=False):
            out = self._mix(gl, hl, self._alphas, r)  # (A, N, K)
        return out if self._is_vector else out[0]

    def outputs_and_surrogate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's outputs and, from the same pass of g and h, a surrogate for attacks: the same mixture in
        logit space (eq. (4) with R_i applied to logits). The log of averaged softmaxes flattens the loss where
        one base model is confident, exactly where an attack needs a gradient; the logit mixture does not
        saturate there. An attack may follow the surrogate's gradient but judges success on the outputs
        (`mixrobust.attacks.APGD`). With ``mix_space="logit"`` both are the outputs."""
        gl, hl, r = self._base(x)
        with torch.autocast(x.device.type, enabled=False):
            out = self._mix(gl, hl, self._alphas, r)
            surrogate = out if self.mix_space is MixSpace.LOGIT else self._mix(gl, hl, self._alphas, r, MixSpace.LOGIT)
        return (out, surrogate) if self._is_vector else (out[0], surrogate[0])

    def _base(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """g's and h's logits (None where no alpha needs them) and R_i (None for R_i = 1)."""
        alphas = self._alphas
        if any(0 < a < 1 for a in alphas) and self.r_option is not ROption.ONE:
            return self._outputs_and_r(x)
        gl = _upcast(self.g(x)) if any(a < 1 for a in alphas) else None
        hl = self.h_map(_upcast(self.h(x))) if any(a > 0 for a in alphas) else None
        return gl, hl, None

    def _mix(self, gl, hl, alphas, r, space: MixSpace | None = None) -> torch.Tensor:
        space = self.mix_space if space is None else space
        if gl is not None and hl is not None and gl.shape != hl.shape:
            raise ConfigError(f"g outputs shape {tuple(gl.shape)} but h outputs {tuple(hl.shape)}")
        if space is MixSpace.PROB:
            gl = None if gl is None else torch.log_softmax(gl, dim=-1)
            hl = None if hl is None else torch.log_softmax(hl, dim=-1)
        if hl is None:  # every alpha is 0
            return gl.unsqueeze(0).repeat(len(alphas), 1, 1)
        if gl is None:  # every alpha is 1
            return hl.unsqueeze(0).repeat(len(alphas), 1, 1)
        mix = mix_log_probs if space is MixSpace.PROB else mix_logits
        return mix(gl, hl, alphas, r)

    def _outputs_and_r(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base logits (N, K) and R_i (N, K) or (N, 1); R is differentiable in x iff x is attacked."""
        attacked = torch.is_grad_enabled() and x.requires_grad
        create_graph = attacked and not self.detach_r
        # inference_mode(False): R_i needs autograd even under Lightning's inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            xin = x if attacked else x.detach().clone().requires_grad_(True)
            gl, hl = _upcast(self.g(xin)), self.h_map(_upcast(self.h(xin)))
            with torch.autocast(x.device.type, enabled=False):
                prob = self.mix_space is MixSpace.PROB
                qg = torch.softmax(gl, dim=-1) if prob else gl
                qh = torch.softmax(hl, dim=-1) if prob else hl
                r = r_values(self.r_option, qg, qh, xin, self.norm.dual, create_graph)
        if not create_graph:
            r = r.detach()
        if not attacked:
            gl, hl = gl.detach(), hl.detach()
        return gl, hl, r
