"""``ELBOModule``: the one LightningModule every method subclasses.

It owns the prior p(z) = N(0, I), the decoder p_theta(x | z) (Bernoulli logits), the k-sample bound, the
train/val/test steps, the metrics and the optimiser. A method overrides only ``infer(x) -> q`` (how q(z | x) is
made) and, where it must, ``training_loss``. Training minimises

    -(1/B) sum_b L_k(x_b),   L_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i | x),   z_i ~ q(z | x)   (k = 1: ELBO),

with optional annealing weights on log p(z) and log q (see ``objectives.log_weights``). Evaluation reports, per
split, exact means over the whole split (torchmetrics, so DDP equals one process):
``nll`` = -IWAE-k estimate of log p(x), ``neg_elbo`` = -L_1[q] (from the same k samples) and
``inference_gap`` = neg_elbo - nll, and ``active_units`` (Burda et al.: units u with Cov_x E_q[z_u] > 0.01, q the
method's evaluation-time q). Evaluation noise is seeded per batch from the batch's position in the split,
so a number does not depend on the world size or on what ran before.
"""
from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from amortlab.data.loader import Batch
from amortlab.distributions import DiagGaussian, posterior_mean
from amortlab.errors import AmortlabError, NonFiniteLossError
from amortlab.evaluation import chunk_size, iwae_estimate
from amortlab.evaluation.ais import AISConfig, ais_log_likelihood
from amortlab.evaluation.gaps import FlowFamilyConfig, GapsConfig, decompose
from amortlab.evaluation.iw_svi import SVIConfig, refine
from amortlab.evaluation.qstar import QStarConfig
from amortlab.metrics import ActiveUnits, ExactMean
from amortlab.objectives import k_sample_bound, log_weights, std_normal_log_prob
from amortlab.regularizers import EncoderRegularizer

# nll: from the configured estimator; nll_iwae: IWAE-k from the method's test-time q (always); neg_elbo: -ELBO of that
# q; inference_gap = neg_elbo - nll; neg_elbo_encoder: -ELBO of the encoder's q before a method's test-time refinement
# (refining methods only); neg_elbo_refined: -ELBO of the refined q (a refining method's q, or IW-SVI's when that
# estimator runs); infer_seconds: wall time of the method's inference (encoder + any refinement) per point
EVAL_METRICS = ("nll", "nll_iwae", "neg_elbo", "inference_gap", "neg_elbo_encoder", "neg_elbo_refined",
                "infer_seconds",
                # gap decomposition (evaluation=gaps): log-likelihoods in nats and the gaps between them
                "gap/log_px", "gap/log_px_iwae", "gap/log_px_iwae_ffg", "gap/log_px_iwae_flow", "gap/log_px_ais",
                "gap/L_q", "gap/L_qstar_ffg", "gap/L_qstar_flow",
                "gap/approximation", "gap/amortization", "gap/inference", "gap/qstar_steps_ffg",
                "gap/qstar_steps_flow", "gap/qstar_converged_frac", "gap/qstar_converged_frac_ffg",
                "gap/qstar_converged_frac_flow", "gap/qstar_tail_gain", "gap/qstar_tail_gain_ffg",
                "gap/qstar_tail_gain_flow")
ESTIMATORS = ("iwae", "iw_svi", "gaps")


class _LogProb(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.decoder.log_prob(x, z)


def frozen_log_prob(decoder: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """log p_theta(x | z) ``[k, B]`` with theta held constant (``torch.func.functional_call`` on detached weights):
    gradients reach z (and through it q's parameters), never the decoder. Same values as ``decoder.log_prob``."""
    params = {f"decoder.{n}": p.detach() for n, p in decoder.named_parameters()}
    return torch.func.functional_call(_LogProb(decoder), params, (x, z))


EVAL_SPLITS = ("val", "test", "train")  # "train": the final evaluation of the first training points (run.py)
_SPLIT_SEED_OFFSET = {"val": 0, "test": 7_777_777, "train": 3_333_331}


def _metric_key(split: str, name: str) -> str:
    return f"{split}_{name}".replace("/", "__")  # ModuleDict keys cannot hold dots; keep them readable


def _gaps_config(node: dict | None) -> GapsConfig:
    node = dict(node or {})
    return GapsConfig(**{**node, "families": list(node.get("families", GapsConfig().families)),
                         "qstar": QStarConfig(**dict(node.get("qstar") or {})),
                         "flow": FlowFamilyConfig(**dict(node.get("flow") or {}))})


class ELBOModule(L.LightningModule):
    """Base method. Subclasses implement ``infer``.

    Args:
        decoder: p_theta(x | z); exposes ``z_dim``, ``log_prob(x [B, X], z [k, B, Z]) -> [k, B]`` and
            ``mean(z) -> E[x | z]`` (Bernoulli MLP by default; the linear-Gaussian decoder has a closed form).
        importance_samples: ``train`` (k of the training bound), ``val`` (k of the per-epoch validation estimate),
            ``test`` (k of the final log-likelihood estimate, 5000 in papers).
        optim: ``optimizer`` (a partial taking params) and optional ``lr_scheduler`` (a partial taking the optimiser)
            with ``interval`` (epoch/step).
        evaluation: ``rows`` (decoder rows per evaluation chunk), ``seed`` (evaluation noise seed).
        regularizer: encoder regularizer (identity by default).
        log_every_n_steps: how often the training loss is logged (``self.log`` every step costs throughput).
    """

    method_name = "base"

    def __init__(self, decoder: nn.Module, importance_samples: dict | None = None, optim: dict | None = None,
                 evaluation: dict | None = None, regularizer: EncoderRegularizer | None = None,
                 log_every_n_steps: int = 50):
        super().__init__()
        self.decoder = decoder
        self.z_dim = decoder.z_dim
        ks = {"train": 1, "val": 10, "test": 5000, **dict(importance_samples or {})}
        self.k_train, self.k_val, self.k_test = int(ks["train"]), int(ks["val"]), int(ks["test"])
        self.optim_cfg = dict(optim or {})
        ev = {"rows": 1000, "seed": 0, "estimator": "iwae", **dict(evaluation or {})}
        self.eval_rows, self.eval_seed = int(ev["rows"]), int(ev["seed"])
        if ev["estimator"] not in ESTIMATORS:
            raise AmortlabError(f"evaluation.estimator={ev['estimator']!r} is unknown; use one of {', '.join(ESTIMATORS)} "
                                f"(or pick the group option: evaluation=iwae / evaluation=iw_svi).")
        self.estimator = ev["estimator"]
        self.svi_cfg = SVIConfig(**dict(ev.get("svi") or {}))
        self.gaps_cfg = _gaps_config(ev.get("gaps"))
        self.ais_cfg = AISConfig(**dict(ev.get("ais") or {}))
        self.final_evaluation = False  # set for the final val/test pass: the configured estimator runs only then
        self.regularizer = regularizer or EncoderRegularizer()
        self.log_every_n_steps = log_every_n_steps
        # annealing weights on log p(z) and log q(z|x) in the training objective (set by callbacks)
        self.prior_weight = 1.0
        self.entropy_weight = 1.0
        self.eval_metric_names = list(EVAL_METRICS)
        self.metrics = nn.ModuleDict({_metric_key(s, m): ExactMean() for s in EVAL_SPLITS for m in EVAL_METRICS})
        self.active_units = nn.ModuleDict({f"{s}_units": ActiveUnits(self.z_dim) for s in EVAL_SPLITS})
        self.eval_results: dict[str, dict[str, float]] = {}
        self.test_split = "test"  # the split a test pass reports as ("train" for the training-point evaluation)
        self.run_config: dict[str, Any] | None = None  # resolved Hydra config, stored in checkpoints

    def register_eval_metrics(self, *names: str) -> None:
        """Per-point evaluation values a method adds (exact means over the split, like the base metrics), e.g.
        ``neg_elbo_iter/3``; ``infer_for_eval`` reports them through its ``diagnostics`` dict."""
        for name in names:
            if name not in self.eval_metric_names:
                self.eval_metric_names.append(name)
                for split in EVAL_SPLITS:
                    self.metrics[_metric_key(split, name)] = ExactMean()

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` ~20 times per step; nn.Module.__setattr__'s type checks on it cost
        # ~0.1 ms per step (5% of a k=1 MNIST step on CPU), so plain values of that name bypass them.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning's generic collection walk costs ~30 us per step; a Batch already on the device needs none
        if isinstance(batch, Batch):
            return batch if batch.x.device == device else batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- what a method defines ----------------------------------------------------------------------------------
    def infer(self, x: Tensor) -> DiagGaussian:
        """q(z | x) for a batch ``x`` ``[B, X]``."""
        raise NotImplementedError

    # --- the bound ------------------------------------------------------------------------------------------------
    def log_weights(self, x: Tensor, q: DiagGaussian, k: int, generator: torch.Generator | None = None,
                    annealed: bool = False, frozen_decoder: bool = False) -> Tensor:
        """log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x), z_i ~ q; ``[k, B]``.

        ``annealed`` applies the current annealing weights (training only); ``frozen_decoder`` holds the decoder's
        parameters constant (a term that must train only q's side, e.g. an encoder's own bound).
        """
        z, log_q = q.rsample_with_log_prob(k, generator)
        return self.log_weights_at(x, z, log_q, annealed, frozen_decoder)

    def log_weights_at(self, x: Tensor, z: Tensor, log_q: Tensor, annealed: bool = False,
                       frozen_decoder: bool = False) -> Tensor:
        """log p(x | z) + log p(z) - log q for given samples z ``[k, B, Z]`` and their log q ``[k, B]``."""
        log_px_z = frozen_log_prob(self.decoder, x, z) if frozen_decoder else self.decoder.log_prob(x, z)
        log_pz = std_normal_log_prob(z)
        if annealed:
            return log_weights(log_px_z, log_pz, log_q, self.prior_weight, self.entropy_weight)
        return log_weights(log_px_z, log_pz, log_q)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x | z) + log N(z; 0, I) for x ``[B, X]``, z ``[k, B, Z]`` -> ``[k, B]``."""
        return self.decoder.log_prob(x, z) + std_normal_log_prob(z)

    def bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """Training objective L_k per example ``[B]``: q from ``x_enc`` (default ``x``), p(x, z) scores ``x``."""
        q = self.infer(x if x_enc is None else x_enc)
        return k_sample_bound(self.log_weights(x, q, k, annealed=True))

    def clean_bound(self, x: Tensor, k: int, x_enc: Tensor | None = None) -> Tensor:
        """L_k(x; q = infer(x_enc)) ``[B]``: the k-sample bound of the method's q, without annealing weights and
        without a method's surrogate terms (whose values can be zero while their gradients are not); what an
        adversarial perturbation of the encoder's input must lower."""
        q = self.infer(x if x_enc is None else x_enc)
        return k_sample_bound(self.log_weights(x, q, k))

    def training_loss(self, x: Tensor) -> Tensor:
        return self.regularizer.training_loss(self, x, self.k_train)

    # --- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch.x)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at global step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); training stopped before that step's update, and the "
                f"checkpoints already written (last.ckpt / best) are intact. Lower the learning rate "
                f"(optim.optimizer.lr=...), add warm-up (callbacks=annealing), or check the data for values outside "
                f"[0, 1]; resume from the last good checkpoint with ckpt_path=.../last.ckpt.")
        if self.global_step % self.log_every_n_steps == 0:
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def _eval_generator(self, batch: Batch, split: str) -> torch.Generator:
        g = torch.Generator(device=batch.x.device)
        g.manual_seed((self.eval_seed * 1_000_003 + _SPLIT_SEED_OFFSET[split] + batch.first_index) % (2**63))
        return g

    @torch.no_grad()
    def evaluate_batch(self, batch: Batch, k: int, split: str = "test",
                       estimator: str | None = None) -> dict[str, Tensor]:
        """Per-example evaluation of one batch, each value ``[B]``.

        ``nll_iwae`` = -IWAE-k from the amortized q and ``neg_elbo`` = -ELBO of that q (same samples). With the
        ``iw_svi`` estimator q is then refined per point (decoder frozen) and ``nll`` = -IWAE-k from the refined q;
        otherwise ``nll`` = ``nll_iwae``. ``inference_gap`` = neg_elbo - nll (against the clean amortized ELBO).
        ``z_mean`` ``[B, Z]`` is E_q[z] of that (amortized or method-refined) q, for the active-unit count.
        """
        x = batch.x
        gen = self._eval_generator(batch, split)
        chunk = chunk_size(k, len(x), self.eval_rows)
        diagnostics: dict[str, Any] = {}
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        q = self.infer_for_eval(x, diagnostics, generator=gen)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = (time.perf_counter() - start) / len(x)
        log_px, elbo = iwae_estimate(lambda n: self.log_weights(x, q, n, gen), k, chunk)
        out = {"nll_iwae": -log_px, "neg_elbo": -elbo,
               "infer_seconds": torch.full_like(elbo, seconds, dtype=torch.float64)}
        q_encoder = diagnostics.pop("q_encoder", None)
        if q_encoder is not None:  # the method refined the encoder's q at test time
            out["neg_elbo_encoder"] = -iwae_estimate(lambda n: self.log_weights(x, q_encoder, n, gen), k, chunk)[1]
            out["neg_elbo_refined"] = -elbo
        for name, values in diagnostics.items():
            if name not in self.eval_metric_names:
                raise KeyError(f"{type(self).__name__}.infer_for_eval reported {name!r}; register it with "
                               f"register_eval_metrics first")
            out[name] = values
        if (estimator or self.estimator) == "gaps":
            ais = (lambda xx: ais_log_likelihood(self.decoder.log_prob, xx, self.z_dim, self.ais_cfg, gen)) \
                if self.gaps_cfg.ais else None
            gaps = decompose(self, x, q, k, self.eval_rows, self.gaps_cfg, gen, ais_fn=ais)
            out.update(gaps)
            log_px = gaps["gap/log_px"]
        elif (estimator or self.estimator) == "iw_svi":
            q_ref = refine(self, x, q, self.svi_cfg, gen)
            log_px, elbo_ref = iwae_estimate(lambda n: self.log_weights(x, q_ref, n, gen), k, chunk)
            out["neg_elbo_refined"] = -elbo_ref
        out["nll"] = -log_px
        out["inference_gap"] = out["neg_elbo"] - out["nll"]
        # a fresh generator, so the numbers above keep their noise stream
        out["z_mean"] = posterior_mean(q, self._eval_generator(batch, split))
        return out

    def infer_for_eval(self, x: Tensor, diagnostics: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> DiagGaussian:
        """q used at evaluation time; methods that refine q at test time override this (any noise they need comes
        from ``generator``, the evaluation's per-batch seeded generator).

        A refining method puts the encoder's unrefined q into ``diagnostics["q_encoder"]`` (the evaluation then
        reports ``neg_elbo_encoder`` / ``neg_elbo_refined``) and may add per-point values ``[B]`` under names it
        registered with ``register_eval_metrics``. Runs under ``torch.no_grad``; refinement that needs gradients
        enables them locally (``torch.inference_mode(False), torch.enable_grad()``) on a detached clone of x.
        """
        return self.infer(x)

    def _eval_step(self, batch: Batch, split: str, k: int) -> None:
        # per-epoch validation during training always uses the cheap IWAE estimate
        estimator = self.estimator if self.final_evaluation else "iwae"
        out = self.evaluate_batch(batch, k, split, estimator)
        self.active_units[f"{split}_units"].update(out.pop("z_mean"))
        for name, values in out.items():
            self.metrics[_metric_key(split, name)].update(values)

    def _eval_epoch_end(self, split: str) -> None:
        """Exact float64 means over the whole split (summed across DDP ranks), logged and kept in
        ``self.eval_results[split]``."""
        out = {}
        for name in self.eval_metric_names:
            metric = self.metrics[_metric_key(split, name)]
            if metric.update_count:
                out[f"{split}/{name}"] = float(metric.compute())
                if name == "nll":
                    out[f"{split}/n_points"] = int(metric.count)  # all ranks; < split size with limit_*_batches
            metric.reset()
        units = self.active_units[f"{split}_units"]
        if units.update_count:
            out[f"{split}/active_units"] = int(units.compute())
            units.reset()
        self.eval_results[split] = out
        if not self.trainer.sanity_checking:
            self.log_dict(out, sync_dist=False)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.k_val)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_split, self.k_test)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_split)

    # --- images ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean images E[x | z], z ~ p(z); ``[n, X]``."""
        z = torch.randn(n, self.z_dim, generator=generator, device=self.device)
        return self.decoder.mean(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z = mean of q(z | x)]; ``[B, X]``."""
        return self.decoder.mean(self.infer_for_eval(x).mu)

    # --- optimisation ---------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        make_opt = self.optim_cfg.get("optimizer")
        opt = make_opt(self.parameters()) if make_opt else torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-4)
        make_sched = self.optim_cfg.get("lr_scheduler")
        if not make_sched:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_sched(opt),
                                                     "interval": self.optim_cfg.get("interval", "epoch")}}

    def init_output_bias(self, x_mean: Tensor) -> None:
        if hasattr(self.decoder, "init_output_bias"):
            self.decoder.init_output_bias(x_mean)

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["amortlab_config"] = self.run_config
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            self._restored_rng_state = checkpoint["torch_rng_state"]

    def on_train_start(self) -> None:
        # restore the global RNG where the checkpoint left it, so a resumed run continues the same noise stream
        state = getattr(self, "_restored_rng_state", None)
        if state is not None:
            torch.set_rng_state(state)
            self._restored_rng_state = None

    def tags(self) -> list[str]:
        return [f"method:{self.method_name}", f"k:{self.k_train}", *self.regularizer.tags()]

    def axes(self) -> dict[str, Any]:
        """The run's coordinates in a study (results.json ``axes``; sweep.py groups and plots by them)."""
        return {"method": self.method_name, "regularizer": self.regularizer.name,
                "strength": self.regularizer.strength, "k": self.k_train}
