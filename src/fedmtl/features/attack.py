"""Feature ``attack:``: malicious clients, for measuring defences (config, checks, behaviour).

Whatever the algorithm, a seeded set of clients tampers with what it trains on or with what it
sends (an algorithm wrapper).

Model poisoning changes the reply: with ``u`` the honest update (returned arrays minus the arrays
received), ``sign_flip`` sends ``-s*u``, ``scale`` sends ``s*u`` (model replacement: with ``s`` =
clients per round the mean lands on the attacker's model), ``gaussian`` sends pure noise.
Data poisoning changes the training split: ``label_flip`` relabels every sample, ``backdoor``
stamps a pixel trigger on a share of the samples and relabels them to the target class, then sends
``s*u`` (s = 1 by default). Label flipping and the trigger reuse ``fedmtl.data.corrupt``.

The attacker set is drawn from the seed alone, so the simulator and every Flower node agree on it
without a message. The backdoor's success rate (triggered global-test inputs of other classes
classified as the target) goes into every round row as ``backdoor_asr``."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from fedmtl.algorithms.base import Algorithm, ClientWork, Message
from fedmtl.algorithms.wrapper import AlgorithmWrapper
from fedmtl.config_base import Strict
from fedmtl.data.corrupt import apply_trigger, attack_success_rate, flip_labels, pick
from fedmtl.data.federated import ClientData, FederatedData
from fedmtl.errors import ConfigError
from fedmtl.runtime.round import sample_size
from fedmtl.training.work import Train, Trained, local_work

if TYPE_CHECKING:
    from fedmtl.config import Config


class AttackConfig(Strict):
    """Malicious clients: a seeded ``fraction`` of the training clients attack every round they are
    sampled in (from ``start_round``). Model-poisoning kinds change the update they send; data-poisoning
    kinds change what they train on."""

    enabled: bool = False
    kind: Literal["sign_flip", "scale", "gaussian", "label_flip", "backdoor"] = "sign_flip"
    fraction: float = Field(0.1, ge=0, le=1)
    #: explicit malicious client ids (replaces ``fraction``)
    clients: list[int] | None = None
    start_round: int = Field(1, ge=1)
    #: factor on the malicious update: sign_flip sends -scale*update (default 1); scale and backdoor
    #: send scale*update (default: clients per round for scale, i.e. model replacement; 1 for backdoor)
    scale: float | None = Field(None, gt=0)
    #: label_flip: 'reverse' maps class c to (classes - 1 - c) on every sample (a consistent attack);
    #: 'random' gives every sample a uniformly drawn different class (``fedmtl.data.corrupt``)
    flip: Literal["reverse", "random"] = "reverse"
    #: gaussian: std of the random update sent instead of the trained one
    noise_std: float = Field(1.0, gt=0)
    #: backdoor: class the trigger maps to, poisoned share of the client's samples, trigger square
    target: int = Field(0, ge=0)
    poison_rate: float = Field(0.5, gt=0, le=1)
    trigger_size: int = Field(3, ge=1)
    trigger_value: float = 1.0


ATTACK_RNG = 12  # rng purpose: (seed, ATTACK_RNG, 0) picks attackers; (seed, ATTACK_RNG, round, cid) draws
_MODEL = ("sign_flip", "scale", "gaussian", "backdoor")


def choose_malicious(cfg: AttackConfig, train_clients: list[int], seed: int) -> list[int]:
    """``cfg.clients`` or a seeded ``round(fraction * n)`` of the training clients."""
    if cfg.clients is not None:
        unknown = sorted(set(cfg.clients) - set(train_clients))
        if unknown:
            raise ConfigError(
                f"config: attack.clients = {cfg.clients}: clients {unknown} do not exist or do not train"
            )
        return sorted(set(cfg.clients))
    k = int(round(cfg.fraction * len(train_clients)))
    if k == 0:
        return []
    rng = np.random.default_rng([seed, ATTACK_RNG, 0])
    return sorted(int(c) for c in rng.choice(train_clients, size=k, replace=False))


class MaliciousClients(AlgorithmWrapper):
    def __init__(
        self, inner: Algorithm, cfg: AttackConfig, malicious: list[int], data: FederatedData, per_round: int
    ) -> None:
        super().__init__(inner)
        self.cfg = cfg
        self.malicious = set(malicious)
        task = data.task
        if cfg.kind in ("label_flip", "backdoor") and not all(
            t.is_classification for t in data.tasks.values()
        ):
            raise ConfigError(f"config: attack.kind = {cfg.kind!r}: needs classification tasks only")
        if cfg.kind == "backdoor" and cfg.target >= task.num_outputs:
            raise ConfigError(
                f"config: attack.target = {cfg.target}: the task has {task.num_outputs} classes "
                f"(0..{task.num_outputs - 1})"
            )
        defaults = {"sign_flip": 1.0, "scale": float(per_round), "backdoor": 1.0}
        self.scale = cfg.scale if cfg.scale is not None else defaults.get(cfg.kind, 1.0)
        self._poisoned: dict[int, ClientData] = {}
        self._asr_x: np.ndarray | None = None
        if cfg.kind == "backdoor" and data.x_global_test is not None:
            keep = data.y_global_test != cfg.target
            self._asr_x = apply_trigger(data.x_global_test[keep], cfg.trigger_size, cfg.trigger_value)
            self._asr_y = data.y_global_test[keep]

    @property
    def tampers(self) -> bool:
        """Whether attackers change what they send (model poisoning; a backdoor only when scaled)."""
        return self.cfg.kind in _MODEL and not (self.cfg.kind == "backdoor" and self.scale == 1.0)

    def is_active(self, cid: int, round: int) -> bool:
        return cid in self.malicious and round >= self.cfg.start_round

    # --- data poisoning -----------------------------------------------------------------------
    def poisoned(self, data: ClientData) -> ClientData:
        """This client's training split as the attacker trains on it (built once, seeded)."""
        if data.cid in self._poisoned:
            return self._poisoned[data.cid]
        rng = np.random.default_rng([self.inner.ctx.seed, ATTACK_RNG, 1, data.cid])
        x, y = data.x_train, data.y_train
        k = data.task.num_outputs
        if self.cfg.kind == "label_flip":
            y = (k - 1 - y) if self.cfg.flip == "reverse" else flip_labels(y, np.arange(len(y)), k, rng)
        else:
            idx = pick(len(y), self.cfg.poison_rate, rng, allowed=y != self.cfg.target)
            x, y = x.copy(), y.copy()
            if len(idx):
                x[idx] = apply_trigger(x[idx], self.cfg.trigger_size, self.cfg.trigger_value)
                y[idx] = self.cfg.target
        out = replace(data, x_train=x, y_train=y)
        self._poisoned[data.cid] = out
        return out

    # --- model poisoning ----------------------------------------------------------------------
    def tamper(self, reply: Message, sent: Message, round: int, cid: int) -> Message:
        arrays = dict(reply.arrays)
        rng = np.random.default_rng([self.inner.ctx.seed, ATTACK_RNG, round, cid])
        for k, v in reply.arrays.items():
            if k not in sent.arrays:
                continue
            ref = sent.arrays[k].astype(np.float64)
            u = v.astype(np.float64) - ref
            if self.cfg.kind == "sign_flip":
                u = -self.scale * u
            elif self.cfg.kind == "gaussian":
                u = rng.normal(0.0, self.cfg.noise_std, u.shape)
            else:
                u = self.scale * u
            arrays[k] = (ref + u).astype(v.dtype)
        return Message(arrays=arrays, scalars=dict(reply.scalars))

    def client_step(
        self, state: dict[str, Any], data: ClientData, msg: Message, work: ClientWork
    ) -> Generator[Train, Trained, tuple[dict[str, Any], Message]]:
        active = self.is_active(data.cid, work.round)
        if active and self.cfg.kind in ("label_flip", "backdoor"):
            data = self.poisoned(data)
        state, reply = yield from local_work(self.inner.client_step(state, data, msg, work))
        if active and self.tampers:
            reply = self.tamper(reply, msg, work.round, data.cid)
        return state, reply

    # --- measurement --------------------------------------------------------------------------
    def backdoor_asr(self, server: dict[str, Any]) -> float | None:
        if self._asr_x is None:
            return None
        params = self.inner.global_params(server)
        if params is None:
            return None
        from fedmtl.training.local import predict
        from fedmtl.training.tensors import to_torch

        pred = predict(self.ctx.model, to_torch(params), self._asr_x).argmax(1).numpy()
        return attack_success_rate(pred, self._asr_y, self.cfg.target)

    def round_info(self, server: dict[str, Any]) -> dict[str, Any]:
        info = dict(self.inner.round_info(server))
        info["malicious"] = len(self.malicious)
        asr = self.backdoor_asr(server)
        if asr is not None:
            info["backdoor_asr"] = asr
        return info


def wrap(algo: Algorithm, cfg: Config, data: FederatedData) -> Algorithm:
    """Malicious clients around ``algo``; a kind the algorithm cannot be attacked with is refused."""
    bad = choose_malicious(cfg.attack, data.train_clients, cfg.seed)
    attacked = MaliciousClients(algo, cfg.attack, bad, data, sample_size(cfg, len(data.train_clients)))
    if attacked.tampers and algo.reduces != "mean":
        raise ConfigError(
            f"config: attack.kind = {cfg.attack.kind!r}: poisons the model update a client sends, and "
            f"algorithm {algo.name!r} sends none (its replies are not new values of what it received)"
        )
    return attacked
