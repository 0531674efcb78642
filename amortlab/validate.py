"""Every run setting checked in one place, before anything is built, logged or written.

``check_config(cfg)`` runs on the composed config (types and ranges of the keys train.py and Lightning read; unknown
top-level keys; ``_target_``s restored from a checkpoint); ``check_data(cfg, datamodule)`` runs once the data is
loaded (a training batch larger than the training set would give zero steps). Each problem is one line naming the
key, the bad value and what is allowed; all problems come in one ``AmortlabError``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from amortlab.config import Config
from amortlab.errors import AmortlabError

# _target_ prefixes a checkpoint's stored config may name (train=false / resume instantiate them)
SAFE_TARGET_PREFIXES = ("amortlab.", "lightning.", "torch.")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False) != "__absent__"


Rule = tuple[str, Callable[[Any, DictConfig], bool], str, str]

# (key, ok(value, cfg), allowed, example). A key the config does not hold is skipped.
RULES: list[Rule] = [
    ("seed", lambda v, c: _int(v), "an integer", "seed=0"),
    ("trainer.max_epochs", lambda v, c: _int(v) and (v >= 1 or (v == -1 and _int(_get(c, "trainer.max_steps"))
                                                                 and _get(c, "trainer.max_steps") >= 1)),
     "an integer >= 1 (-1 only together with trainer.max_steps >= 1; otherwise the run would never end)",
     "trainer.max_epochs=20"),
    ("trainer.max_steps", lambda v, c: _int(v) and (v == -1 or v >= 1), "-1 (no limit) or an integer >= 1",
     "trainer.max_steps=-1"),
    ("trainer.check_val_every_n_epoch", lambda v, c: v is None or (_int(v) and v >= 1), "an integer >= 1",
     "trainer.check_val_every_n_epoch=1"),
    ("trainer.log_every_n_steps", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "trainer.log_every_n_steps=50"),
    ("trainer.devices", lambda v, c: v == "auto" or (_int(v) and v >= 1) or isinstance(v, (list, ListConfig)),
     "an integer >= 1, a list of device ids or auto", "trainer.devices=1"),
    ("trainer.num_nodes", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "trainer.num_nodes=1"),
    ("dataset.batch_size", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "dataset.batch_size=100"),
    ("dataset.eval_batch_size", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "dataset.eval_batch_size=100"),
    ("dataset.train_subset", lambda v, c: v is None or (_int(v) and v >= 1), "null or an integer >= 1",
     "dataset.train_subset=2000"),
    ("importance_samples.train", lambda v, c: _int(v) and v >= 1, "an integer >= 1 (k = 1 is the ELBO)",
     "importance_samples.train=1"),
    ("importance_samples.val", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "importance_samples.val=10"),
    ("importance_samples.test", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "importance_samples.test=5000"),
    ("optim.optimizer.lr", lambda v, c: _num(v) and v > 0, "a number > 0", "optim.optimizer.lr=1e-3"),
    ("optim.optimizer.eps", lambda v, c: _num(v) and v > 0, "a number > 0", "optim.optimizer.eps=1e-4"),
    ("optim.interval", lambda v, c: v in ("epoch", "step"), "epoch or step", "optim.interval=epoch"),
    ("evaluation.rows", lambda v, c: _int(v) and v >= 1, "an integer >= 1", "evaluation.rows=1000"),
    ("evaluation.ckpt", lambda v, c: v in ("best", "last"), "best (lowest validation NLL) or last",
     "evaluation.ckpt=best"),
    ("evaluation.train_points", lambda v, c: _int(v) and v >= 0, "an integer >= 0 (0 = none)",
     "evaluation.train_points=0"),
]
for _key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
    RULES.append((f"trainer.{_key}",
                  lambda v, c: v is None or (_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0),
                  "null (all), an integer number of batches >= 0 or a fraction in [0, 1]", f"trainer.{_key}=10"))


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield path or "<root>", node["_target_"]
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def check_stored_targets(stored: dict[str, Any], source: str) -> None:
    """Refuse a stored config (a checkpoint's) whose ``_target_``s point outside amortlab, Lightning and torch:
    instantiating it would run arbitrary code."""
    bad = [f"{p}: {t}" for p, t in _targets(stored) if not t.startswith(SAFE_TARGET_PREFIXES)]
    if bad:
        raise AmortlabError(f"The config stored in {source} names classes outside amortlab, Lightning and torch "
                            f"({'; '.join(bad[:5])}); building them would run code from the checkpoint. Use a "
                            f"checkpoint written by train.py, or pass the groups yourself and load only its weights.")


def check_config(cfg: DictConfig) -> None:
    """Every rule in ``RULES`` plus unknown top-level keys; raises one ``AmortlabError`` listing all problems."""
    problems = []
    known = {f.name for f in dataclasses.fields(Config)} | {"hydra"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown} (added with +KEY=...; nothing reads them): remove them "
                        f"(known keys: {', '.join(sorted(known - {'hydra'}))})")
    problems += _layer_problems(cfg) + _conv_problems(cfg) + _sequence_problems(cfg)
    for key, ok, allowed, example in RULES:
        if not _has(cfg, key):
            continue
        value = _get(cfg, key)
        if not ok(value, cfg):
            problems.append(f"{key}={value!r} must be {allowed} (e.g. {example})")
    if problems:
        raise AmortlabError("Invalid settings, nothing was started: " + "; ".join(problems) + ".")


# encoders of one latent layer: a posterior=<family> choice swaps the model's encoder for one of them
_ONE_LAYER_ENCODERS = ("amortlab.nets.GaussianEncoder", "amortlab.nets.FlowEncoder", "amortlab.nets.IAFEncoder")


def _layer_problems(cfg: DictConfig) -> list[str]:
    """A model with several stochastic layers whose encoder was swapped for a one-layer family (posterior=...)."""
    dims = _get(cfg, "model.generative.latent_dims")
    target = _get(cfg, "model.encoder._target_")
    if isinstance(dims, (list, ListConfig)) and len(dims) > 1 and target in _ONE_LAYER_ENCODERS:
        return [f"model.encoder._target_={target} is a q over one latent layer, but the model has {len(dims)} "
                f"stochastic layers (latent_dims={list(dims)}): drop the posterior=... override (the model's own "
                f"layered encoder, amortlab.nets.BottomUpEncoder, gives a Gaussian per layer; inference=ladder, "
                f"iterative and sa_vae use it too)"]
    return []


def _conv_problems(cfg: DictConfig) -> list[str]:
    """A convolutional model (model=conv|pixelcnn) given an MLP-trunk family (posterior=...) or an MLP width preset
    (encoder_size=...)."""
    if not _has(cfg, "model.encoder.channels"):
        return []
    target = _get(cfg, "model.encoder._target_")
    if target in _ONE_LAYER_ENCODERS:
        return [f"model.encoder._target_={target} has an MLP trunk, but this model's encoder is convolutional "
                f"(model=conv or pixelcnn: a Gaussian q from amortlab.nets.ConvEncoder): drop the posterior=... "
                f"override"]
    if isinstance(_get(cfg, "model.encoder.hidden"), (list, ListConfig)):
        return ["encoder_size=... sets MLP layer widths, but this model's encoder is convolutional: drop it and set "
                "the dense width with model.encoder.hidden=N"]
    return []


_SEQUENCE_DATA = ("MovingMNISTDataModule", "LGSSMDataModule", "PolyphonicMusicDataModule")
_SEQUENCE_METHODS = ("FilteringVAE", "AVF")
_SEQUENCE_ESTIMATORS = ("iwae", "smc")


def _name(cfg: DictConfig, key: str) -> str:
    return str(_get(cfg, key) or "").rsplit(".", 1)[-1]


def _sequence_problems(cfg: DictConfig) -> list[str]:
    """Sequence datasets, sequence models (model=srnn|lgssm), the filtering schemes and evaluation=smc go together."""
    seq_data = _name(cfg, "dataset._target_") in _SEQUENCE_DATA
    seq_model = _has(cfg, "model.filter")
    seq_method = _name(cfg, "inference._target_") in _SEQUENCE_METHODS
    estimator = _name(cfg, "evaluation.estimator._target_").lower()
    out = []
    if seq_model and not seq_data:
        out.append("the model is a sequence model (model=srnn or lgssm) but the dataset is not a sequence dataset: use "
                   "dataset=moving_mnist, lgssm, jsb_chorales, piano_midi, musedata or nottingham")
    if seq_data and not seq_model:
        out.append("the dataset holds sequences (one row = T steps of [x_t, present flag]) but the model is static: "
                   "use model=srnn (or model=lgssm with dataset=lgssm)")
    if seq_model and not seq_method:
        out.append(f"the inference scheme ({_name(cfg, 'inference._target_')}) is static; sequence models take "
                   f"inference=filtering (a direct filter) or inference=avf (amortized variational filtering)")
    if seq_method and not seq_model:
        out.append("inference=filtering / avf need a sequence model (model=srnn or lgssm) and a sequence dataset")
    if _name(cfg, "model.generative._target_") == "LinearGaussianSSM" and _name(cfg, "dataset._target_") != \
            "LGSSMDataModule":
        out.append("model=lgssm takes its parameters from dataset=lgssm; for other sequence data use model=srnn")
    if seq_model and estimator and estimator not in _SEQUENCE_ESTIMATORS:
        out.append(f"the estimator {_name(cfg, 'evaluation.estimator._target_')} refines or anneals a static per-point "
                   f"q; sequence models are evaluated "
                   f"with evaluation=iwae (IWAE-k over sequences) or evaluation=smc (a particle filter)")
    if estimator == "smc" and not seq_model:
        out.append("evaluation=smc is a particle filter over time steps: it needs a sequence model (model=srnn or "
                   "lgssm); use evaluation=iwae for static models")
    if seq_model and _get(cfg, "model.encoder") is not None:
        out.append("posterior=... / encoder_size=... set a static encoder, which sequence models do not use: drop it "
                   "(the filter is model.filter; AVF's update network is model.update_hidden)")
    return out


def check_data(cfg: DictConfig, train_size: int) -> None:
    """A training batch must fit in the training set (the loader drops the incomplete last batch)."""
    bs = int(cfg.dataset.batch_size)
    if cfg.train and bs > train_size:
        raise AmortlabError(f"dataset.batch_size={bs} is larger than the training set ({train_size} images): every "
                            f"epoch would have zero training steps. Use at most {train_size} "
                            f"(e.g. dataset.batch_size={min(100, train_size)}).")
