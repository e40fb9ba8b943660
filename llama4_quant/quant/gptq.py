"""GPTQ (Frantar et al. 2022) on a pluggable grid, with the failure modes of sparse MoE calibration.

Columns are rounded one at a time onto `grid` and each rounding error is spread over the columns not
yet rounded, through the Cholesky factor of the (damped) Hessian, in lazy blocks.

- damping: `damp` * mean(diag H) is added to the diagonal; if a Cholesky factorisation fails the
  damping is multiplied by `damp_growth` and retried up to `max_damp`, then RTN is used instead.
- no inverse: GPTQ is usually written with the upper Cholesky factor U of Hd^-1; the passes here use R = U^-1,
  the upper factor of Hd itself (R R^T = Hd, one Cholesky factorisation of the reversed matrix), and compute each
  column's value from the finished columns' errors through R (see _gptq_pass): the same result, without the
  triangular inverse (a third of the factorisation's flops; 8,192 columns: seconds per expert on a CPU).
- dead columns (diag H == 0: the input feature was always zero) get H_jj = 1 and, by default, a
  zero weight.
- an empty Hessian (no calibration tokens) means RTN.
- act-order (desc_act) visits columns by decreasing diag H with *static groups*: every group's params
  are fitted on the original (unpermuted, not yet updated) weights before the first column is
  rounded, so the checkpoint keeps plain contiguous groups and needs no g_idx.
Without act-order, a group's params are fitted lazily on the updated weights when GPTQ reaches its
first column (static_groups=True fits them all up front instead).
- shrinkage: a Hessian estimated from n tokens for d input columns has rank <= n and, when n is not
  much larger than d (a routed expert that saw a few hundred tokens, a short calibration set), GPTQ
  fits the error feedback to the calibration tokens' own directions: its loss on them drops 10-100x
  below RTN's while its loss on other text ends up *above* RTN's. The off-diagonal part of H is
  therefore shrunk towards the diagonal, H <- (1 - a) H + a diag(H) with a = s d / (s d + n)
  (`shrink` = s: a prior worth s tokens per column of uncorrelated inputs with the same per-column
  energy): a = 0.06 for 4096 tokens into 256 columns, 0.5 when n = d. diag(H), and so the column
  importance and the damping, is unchanged. Off when n_tokens is unknown or `shrink` is 0.
- RTN guard (`rtn_guard`): the original weights are also rounded to nearest, with a plain fit of
  the grid (what an uncalibrated run writes) and on GPTQ's own grid (static groups: the params GPTQ
  rounded onto; lazy groups: a fit weighted by diag(H)), and when one of those has a lower Hessian
  loss tr(dW H dW^T)/2 on the calibration Hessian than GPTQ's result, it is kept instead (method
  "rtn", `reason` says which and both losses; ties keep GPTQ). Both losses are recorded (gptq_loss,
  rtn_loss), so a calibrated result is never worse than an uncalibrated one by the measure GPTQ
  minimises. Costs one plain fit per group and a few matrix products; when GPTQ's loss is below CLEAR_WIN (0.8)
  x plain RTN's, only plain RTN is computed (and recorded as rtn_loss). A weight of 4,096 rows or more first
  estimates plain RTN's loss from 1,024 of its rows (_sampled_rtn_loss); GPTQ's exact loss below 0.7 x that
  estimate decides without the rest (the record's rtn_rows says the rtn_loss is that estimate).
- scale search (`scale_search`, int grids): each group's range is searched (ratios 1 .. 1 - `search_shrink` of
  min-max, `search_steps` of them, per row) for the least rounding error weighted per column by `fit_importance`:
  "gptq" (the int default) weighs column j by 1 / U_jj^2, U the upper Cholesky factor of H^-1 in GPTQ's order:
  what a rounding error in that column costs once the columns after it have compensated it (the loss of GPTQ is
  sum_j err_j^2 / U_jj^2), where diag(H) over-weights the early columns whose error is mostly compensated. The
  GGUF grids keep diag(H), llama-quantize's imatrix weighting (their searches are llama.cpp's). Int grids of more
  than `search_max_bits` (4) bits get neither the search nor the refine round: at 8 bits the search's RTN proxy
  clips ranges GPTQ's compensation does not need (calibration loss +0.3 %, KLD +20 % on the shipped model) and
  the least-squares scales sit within one bf16 step of min-max ones (the refine round changed no loss).
- refine passes (`refine`, grids with `refit_scales`: the int grids): with GPTQ's codes fixed, the row's group
  scales with the least Hessian loss solve a G x G linear system per row (grid.lsq_scales); GPTQ then runs again on
  those scales (static, so it may pick other codes). Of {the previous result, its codes on the new scales, the new
  pass} the one with the lowest loss on GPTQ's damped Hessian (what a pass minimises; the pass and the normal
  equations give it without another product) is kept; stops when a round does not improve. One round (the
  default) has almost all of the gain: on the shipped model the second round lowered the loss by 0.06 %.
- coordinate descent (`cd_sweeps`, int grids): +-1 code moves, column by column, that lower the loss; with an
  `out_metric` A (gptq argument, [k, out]) the loss gains lam |A dW X|^2, which for a Linear writing the residual
  stream (down projections, wo) with A = the later layers' router rows times their ffn_norm weights shapes the
  error away from the directions the routers read (routing flips are most of a quantized MoE's KL divergence).
- asymmetric calibration (`asym` argument: hessian.AsymmetricAccumulator.cross, GPTAQ): the target becomes the
  unquantized model's output W x_fp for the quantized model's input x_q: GPTQ rounds towards
  W* = W (I + cross (H + damping)^-1) and all losses (record, refine, RTN guard) are measured against W*.
`asym` and `out_metric` need statistics only the pipeline has (an unquantized activation stream, the later
routers): see docs/quality.md for what the pipeline would pass.
The record says which of these happened.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .columns import Affine, affine_grid, round_sub_block, tables
from .descent import descend
from .grid import Grid, IntGrid, IntParams, group_slices
from .rtn import QuantRecord, QuantResult, hessian_loss, row_sample, rtn, weight_loss


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    damp_growth: float = 10.0  # factor applied after a failed Cholesky
    max_damp: float = 1.0  # beyond this: give up and use RTN
    act_order: bool = False
    static_groups: bool = False  # forced on by act_order
    zero_dead_columns: bool = True
    use_importance: bool = True  # hand diag(H) of a group's columns to grid.fit
    shrink: float = 0.25  # prior tokens per input column towards diag(H) (see module doc); 0: off
    rtn_guard: bool = True  # keep RTN on the same grid where its Hessian loss is lower
    scale_search: bool = True  # int grids: importance-weighted MSE search of every group's range (see module doc)
    search_steps: int = 20  # ratios 1 .. 1 - search_shrink tried by scale_search
    search_shrink: float = 0.2
    search_max_bits: int = 4  # scale_search and refine only on int grids of at most this many bits (see module doc)
    refine: int = 1  # extra GPTQ passes on re-fitted group params (see module doc); 0: one pass
    refine_fit: str = "auto"  # "lsq" (int grids: least-squares scales for the codes) | "refit" (grid.fit on the
    #                           weights GPTQ rounded) | "none" | "auto" (lsq on int grids, none on others)
    fit_importance: str = "auto"  # per-column weights for grid.fit: "diag" (diag H) | "gptq" (1 / U_ii^2) | "auto"
    #                               ("gptq" for an int grid's MSE search, "diag" otherwise: the GGUF searches)
    cd_sweeps: int | None = None  # int grids: coordinate-descent sweeps over the codes after GPTQ (coordinate_descent);
    #                               None: 2 when gptq() is given an out_metric, else 0
    metric_weight: float = 1.0  # weight of the `out_metric` term relative to the plain loss at GPTQ's solution


def shrinkage(shrink: float, cols: int, n_tokens: int | None) -> float:
    """Weight `a` of diag(H) in (1 - a) H + a diag(H) for a Hessian of `n_tokens` tokens over `cols` columns."""
    if not shrink or not n_tokens or n_tokens < 0:
        return 0.0
    prior = shrink * cols
    return prior / (prior + n_tokens)


def damped_factor(
    h: torch.Tensor, damp: float, growth: float, max_damp: float
) -> tuple[torch.Tensor | None, float]:
    """Upper triangular R with R R^T = H + d * mean(diag H) * I, raising d until the factorisation works.

    Returns (R, d), or (None, last d tried) when even `max_damp` fails. R is what GPTQ's passes use directly: the
    upper Cholesky factor U of the inverse (U^T U = Hd^-1) that GPTQ is usually written with is R^-1, so the
    inverse is never formed (see _gptq_pass)."""
    mean_diag = h.diagonal().mean()
    d = damp
    while d <= max_damp * (1 + 1e-6):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        upper = _reversed_cholesky(hd)
        if upper is not None:
            return upper, d
        d *= growth
    return None, d / growth


def _reversed_cholesky(hd: torch.Tensor) -> torch.Tensor | None:
    """Upper R with R R^T = Hd, or None when Hd is not positive definite (numerically): with P the order-reversing
    permutation and P Hd P = L L^T, R = P L P. One Cholesky factorisation, C^3 / 3 flops."""
    lower, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
    if int(info) != 0:
        return None
    upper = lower.flip(0, 1)
    # info == 0 already means positive pivots; the checks catch what a LAPACK might let through, cheaply: a
    # non-finite entry anywhere makes the sum non-finite (the entries are bounded by sqrt(max diag Hd), no overflow)
    if not bool(torch.isfinite(upper.sum())) or not bool((upper.diagonal() > 0).all()):
        return None
    return upper


def _block_size(block: int, group: int, cols: int, static: bool) -> int:
    """Block width such that every lazily fitted group starts where its weights are up to date."""
    if static or group >= cols:
        return block
    if group <= block:
        return (block // group) * group  # groups never straddle a block
    return math.gcd(group, block)  # each group starts on a block boundary


@dataclass
class GPTQJob:
    """One Hessian and the weights that share it (each [rows_k, in]): a Linear, or the gate and up projections of
    one expert (same input), or q/k/v of one attention. Each weight gets its own result, record and RTN guard; the
    factorisation and the column loop are shared."""

    weights: list[torch.Tensor]
    hessian: torch.Tensor
    n_tokens: int | None = None
    asym: torch.Tensor | None = None  # see gptq()
    out_metrics: list[torch.Tensor | None] | None = None  # per weight, see gptq()


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    config: GPTQConfig = GPTQConfig(),
    n_tokens: int | None = None,
    asym: torch.Tensor | None = None,
    out_metric: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize `weight` [out, in] against `hessian` [in, in] (2/n X^T X, see hessian.py).

    n_tokens: calibration tokens behind the Hessian, if known (0 means empty -> RTN).
    asym: asymmetric calibration (hessian.AsymmetricAccumulator.cross, [in, in]): the target becomes the
    unquantized model's output W x_fp for the quantized model's input x_q, i.e. GPTQ rounds towards
    W* = W (I + asym (H + damping)^-1) and every loss (the record's, the RTN guard's) is measured against W*.
    out_metric: [k, out] directions of the output whose error matters beyond its plain energy (for a Linear that
    writes the residual stream: the later routers' rows); used by the coordinate-descent sweeps (cd_sweeps).
    Works on the device of `weight`; the Hessian is moved there. One job of gptq_batch.
    """
    job = GPTQJob([weight], hessian, n_tokens, asym, None if out_metric is None else [out_metric])
    return gptq_batch([job], grid, config)[0][0]


@torch.no_grad()
def gptq_rows(blocks: Iterable[torch.Tensor], hessian: torch.Tensor, grid: Grid, config: GPTQConfig = GPTQConfig(),
              n_tokens: int | None = None) -> Iterator[QuantResult]:
    """GPTQ of a tall weight given as row blocks ([rows_b, in] each, in order), against one Hessian factored once:
    one result per block, each what gptq() of the whole weight computes for those rows (rows are independent given
    the factor; the RTN guard decides per block, so the whole is never worse than RTN either). Memory stays at one
    block: the pipeline streams the 202,048-row output head this way."""
    prep = None
    for block in blocks:
        w0 = block.detach().to(torch.float32)
        if prep is None:
            prep = _factor(hessian, n_tokens, grid, config, w0.shape[1], w0.device)
        if isinstance(prep, tuple):
            yield _fallback([w0], grid, prep[0], n_tokens, prep[1])[0]
            continue
        _add_items(prep, [w0], None, config)
        _run([prep], grid, config)
        yield _finish(prep, GPTQJob([w0], hessian, n_tokens), grid, config)[0]
        prep.items, prep.t0 = [], time.perf_counter()


class _Item:
    """One weight of a job on its way through GPTQ."""

    def __init__(self, w0: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, fitted_on: torch.Tensor, groups: int):
        self.w0, self.w, self.ref, self.fitted_on = w0, w, ref, fitted_on
        self.params: list[Any] = [None] * groups
        self.static_fit: list[Any] = []
        self.q: torch.Tensor | None = None
        self.wt: torch.Tensor | None = None
        self.loss = math.inf
        self.passes: list[float] = []
        self.done = False


class _Prepared:
    """A job's Hessian, factor and items, ready for the batched column loop."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


@torch.no_grad()
def gptq_batch(jobs: list[GPTQJob], grid: Grid, config: GPTQConfig = GPTQConfig()) -> list[list[QuantResult]]:
    """GPTQ of several jobs at once: results[j][k] for weight k of job j.

    The column loop runs once for all weights of all jobs of one layout (the same weight shapes: batched matrix
    products over the jobs' own factors, one rounding call per column for every row of every weight), so a MoE
    layer's experts cost one loop, not one per expert. Per weight, everything is what gptq() of that weight alone
    computes, up to float rounding order. Jobs of other layouts get loops of their own; so do act-order jobs (each
    has its own column order) unless the grid can give one column's params (`column_params(params, offset)`,
    which every grid here has).
    """
    results: list[list[QuantResult | None]] = [[None] * len(j.weights) for j in jobs]
    ready: list[tuple[int, _Prepared]] = []
    for ji, job in enumerate(jobs):
        prep = _prepare(job, grid, config)
        if isinstance(prep, list):
            results[ji] = prep
        else:
            ready.append((ji, prep))
    batches: dict[Any, list[tuple[int, _Prepared]]] = {}
    for ji, prep in ready:
        alone = config.act_order and not callable(getattr(prep.fit_grid, "column_params", None))
        key = (ji,) if alone else (prep.layout, str(prep.device), prep.static, prep.bs)
        batches.setdefault(key, []).append((ji, prep))
    for batch in batches.values():
        preps = [p for _, p in batch]
        _run(preps, grid, config)
        for ji, prep in batch:
            results[ji] = _finish(prep, jobs[ji], grid, config)
    return results  # type: ignore[return-value]


def _prepare(job: GPTQJob, grid: Grid, config: GPTQConfig) -> _Prepared | list[QuantResult]:
    w0s = [w.detach().to(torch.float32) for w in job.weights]
    cols = w0s[0].shape[1]
    if any(w.dim() != 2 or w.shape[1] != cols for w in w0s):
        raise ValueError("the weights of one GPTQ job must be 2-D with the same number of input columns")
    prep = _factor(job.hessian, job.n_tokens, grid, config, cols, w0s[0].device)
    if isinstance(prep, tuple):
        return _fallback(w0s, grid, prep[0], job.n_tokens, prep[1])
    _add_items(prep, w0s, job.asym, config)
    return prep


def _fallback(w0s: list[torch.Tensor], grid: Grid, reason: str, n_tokens: int | None,
              damp: float | None = None) -> list[QuantResult]:
    out = []
    for w0 in w0s:
        res = rtn(w0, grid, reason=reason)  # loss on the weights: H is empty or not trustworthy
        res.record.damp = damp
        res.record.n_tokens = n_tokens
        out.append(res)
    return out


def _factor(hessian: torch.Tensor, n_tokens: int | None, grid: Grid, config: GPTQConfig, cols: int,
            device: torch.device) -> _Prepared | tuple[str, float | None]:
    """Everything of a job that depends on its Hessian alone (shrinkage, damping, the damped Hessian's factor,
    the column importance), or the reason GPTQ falls back to RTN."""
    t0 = time.perf_counter()
    h0 = hessian.detach().to(device=device, dtype=torch.float32)
    if h0.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(h0.shape)} does not match {cols} input columns")
    diag0 = h0.diagonal()
    if n_tokens == 0 or not bool((diag0 != 0).any()):
        return "empty Hessian (no calibration tokens)", None
    if not bool(torch.isfinite(h0).all()):
        return "non-finite Hessian", None

    h = h0.clone()
    dead = torch.nonzero(diag0 == 0).squeeze(1)
    h[dead, dead] = 1.0
    alpha = shrinkage(config.shrink, cols, n_tokens)
    if alpha > 0:
        diag = h.diagonal().clone()
        h.mul_(1.0 - alpha)
        h.diagonal().copy_(diag)  # (1 - a) H + a diag(H): off-diagonal part scaled, diagonal kept

    group = grid.group_size or cols
    slices = group_slices(cols, group)
    mode = config.refine_fit
    fine = isinstance(grid, IntGrid) and grid.scheme.bits > config.search_max_bits
    can_lsq = callable(getattr(grid, "refit_scales", None)) and not fine  # the grid solves its scales for given codes
    if mode == "auto":
        mode = "lsq" if can_lsq else "none"
    if mode == "lsq" and not can_lsq:
        mode = "none"
    static = config.act_order or config.static_groups or group >= cols

    order = torch.arange(cols, device=device)
    if config.act_order:
        order = torch.argsort(h.diagonal(), descending=True)
    hp = h[order][:, order] if config.act_order else h
    factor, damp = damped_factor(hp, config.damp, config.damp_growth, config.max_damp)
    if factor is None:
        return f"Cholesky failed with damping up to {damp:g} of mean diag(H)", damp
    del hp

    fit_grid = _search_grid(grid, config)
    imp_kind = config.fit_importance
    if imp_kind == "auto":
        imp_kind = "gptq" if isinstance(fit_grid, IntGrid) and fit_grid.mse else "diag"
    importance = None
    if config.use_importance:
        if imp_kind == "gptq":  # the weight GPTQ's loss gives a rounding error in each column
            importance = torch.empty(cols, device=device)
            importance[order] = factor.diagonal().square()  # 1 / U_jj^2 = R_jj^2
        else:
            importance = h.diagonal().clone()
    return _Prepared(
        t0=t0, h0=h0, h=h, diag0=diag0, dead=dead, alpha=alpha, factor=factor, damp=damp, group=group,
        perm=order if config.act_order else None, slices=slices, mode=mode,
        refine=config.refine if mode in ("lsq", "refit") else 0, static=static, fit_grid=fit_grid,
        importance=importance, items=[], layout=(), device=device, n_tokens=n_tokens, cols=cols,
        bs=_block_size(config.block_size, group, cols, static), delta=damp * h.diagonal().mean(), hd=None,
    )


def _damped(prep: _Prepared) -> torch.Tensor:
    """The damped Hessian Hd = H + delta I whose inverse's factor GPTQ's passes use (a new [in, in] matrix)."""
    hd = prep.h.clone()
    hd.diagonal().add_(prep.delta)
    return hd


def _add_items(prep: _Prepared, w0s: list[torch.Tensor], asym: torch.Tensor | None, config: GPTQConfig) -> None:
    """The weights a factored job quantizes (replacing any earlier ones: gptq_rows reuses a factor per row block)."""
    items = []
    for w0 in w0s:
        ref = w0  # what every loss is measured against: W, or W* under asymmetric calibration
        if asym is not None:
            ref = w0 + torch.linalg.solve(_damped(prep), (w0 @ asym.to(w0)).t()).t()
        w = ref  # GPTQ's start weights (the pass works on its own transposed copy)
        if config.zero_dead_columns and prep.dead.numel():
            w = ref.clone()
            w[:, prep.dead] = 0.0
        fitted_on = w if (asym is not None or (config.zero_dead_columns and prep.dead.numel())) else w0
        item = _Item(w0, w, ref, fitted_on, len(prep.slices))
        if prep.static:
            imp = prep.importance
            item.params = [prep.fit_grid.fit(fitted_on[:, s], None if imp is None else imp[s]) for s in prep.slices]
        item.static_fit = list(item.params)
        items.append(item)
    prep.items = items
    prep.layout = (tuple(int(w.shape[0]) for w in w0s), prep.cols)


def _run(preps: list[_Prepared], grid: Grid, config: GPTQConfig) -> None:
    """GPTQ's passes (the first and the refine rounds) for jobs of one layout, batched; each item keeps the
    candidate (previous result, its codes on refitted scales, the new pass) with the lowest loss."""
    p0 = preps[0]
    items = [it for p in preps for it in p.items]
    keep_wt = p0.mode == "refit"
    _batched_pass(preps, [it.w for it in items], [it.params for it in items], p0.fit_grid, keep_wt, items)
    for it in items:
        it.passes = [it.loss]  # losses against GPTQ's start weights w on its damped Hessian: what each pass minimises
    for _ in range(p0.refine):
        live = [(p, it) for p in preps for it in p.items if not it.done]
        if not live:
            break
        cands: dict[int, list] = {}
        new_params: dict[int, list] = {}
        for p, it in live:
            cands[id(it)] = []
            if p.mode == "lsq":
                if p.hd is None:
                    p.hd = _damped(p)
                np_, q_same, same_loss = grid.refit_scales(it.w, it.q, it.params, p.hd)
                cands[id(it)].append((q_same, None, np_, same_loss))  # GPTQ's codes on the least-squares scales
            else:
                imp = p.importance
                np_ = [p.fit_grid.fit(it.wt[:, s], None if imp is None else imp[s]) for s in p.slices]
            new_params[id(it)] = np_
        # the next pass, on the new params, for every item of a job with a live item (the others drop out)
        sub_preps = [p for p in preps if any(not it.done for it in p.items)]
        runs = [it for p in sub_preps for it in p.items]
        shadow = [_Item(it.w0, it.w, it.ref, it.fitted_on, 0) for it in runs]  # receive the pass's q, wt, loss
        _batched_pass(sub_preps, [it.w for it in runs],
                      [list(new_params[id(it)]) if id(it) in new_params else list(it.params) for it in runs],
                      p0.fit_grid, keep_wt, shadow)
        for it, sh in zip(runs, shadow):
            if it.done:
                continue
            cands[id(it)].append((sh.q, sh.wt, new_params[id(it)], sh.loss))
            improved = False
            for qc, wc, pc, lc in cands[id(it)]:
                if lc < it.loss:
                    improved = True
                    it.q, it.params, it.loss = qc, pc, lc
                    it.wt = wc if wc is not None else it.wt
            it.passes.append(it.loss)
            if not improved:
                it.done = True
    for p in preps:
        p.hd = None


def _batched_pass(preps: list[_Prepared], ws: list[torch.Tensor], params: list[list[Any]], grid: Grid,
                  keep_wt: bool, out: list[_Item]) -> None:
    """One GPTQ sweep for the items of `preps` (weights `ws`, in order, grouped by job; every job has the same
    layout); sets q, wt and loss on the `out` items. `params` entries that are None are fitted lazily and filled in."""
    p0 = preps[0]
    rows, cols = p0.layout
    per_job = len(rows)
    offsets = [sum(rows[:k]) for k in range(per_job + 1)]
    jobs = len(preps)
    wT = torch.empty(jobs, cols, offsets[-1], device=p0.device)
    for k, w in enumerate(ws):
        j, s = divmod(k, per_job)
        wT[j, :, offsets[s]:offsets[s + 1]] = w.t()
    factor = p0.factor.unsqueeze(0) if jobs == 1 else torch.stack([p.factor for p in preps])
    perm = None if p0.perm is None else (p0.perm if jobs == 1 else torch.stack([p.perm for p in preps]))
    qT, wtT, loss = _gptq_pass(wT, factor, grid, params, [p.importance for p in preps], perm, p0.group, p0.bs,
                               rows, keep_wt)
    del wT, factor
    for k, it in enumerate(out):
        j, s = divmod(k, per_job)
        sl = slice(offsets[s], offsets[s + 1])
        it.q = qT[j, :, sl].t().contiguous()
        it.wt = wtT[j, :, sl].t().contiguous() if wtT is not None else None
        it.loss = float(loss[j, sl].sum())
        it.params = params[k]


def _h0_loss(prep: _Prepared, it: _Item) -> float:
    """tr((W - Q) H0 (W - Q)^T) / 2 on the calibration Hessian H0 from the loss GPTQ's pass accumulated on its
    damped, shrunk Hessian Hd = (1 - a) H' + a diag(H') + d I (H': H0 with 1 on dead diagonals), without another
    [rows x in x in] product: with D = w - q, D Hd D^T = (1 - a) D H' D^T + sum_j (a H'_jj + d) D_j^2 and
    D H' D^T = D H0 D^T + sum_dead D_j^2. W* and GPTQ's start weights differ only in dead columns, where H0 is 0.
    Agrees with the direct product to about 1e-6 (relative; tests/quant/test_quant_gptq_batch.py)."""
    d = torch.sub(it.w, it.q)
    col = d.square_().sum(0).double()  # per column: torch's float32 sum is blocked, within 2e-7 of float64's, 4x as fast
    del d
    hp = prep.h0.diagonal().double().clone()
    hp[prep.dead] = 1.0
    delta = float(prep.delta)
    full = (2 * it.loss - float((col * (prep.alpha * hp + delta)).sum())) / (1 - prep.alpha)
    return max(0.0, (full - float(col[prep.dead].sum())) / 2)


def _finish(prep: _Prepared, job: GPTQJob, grid: Grid, config: GPTQConfig) -> list[QuantResult]:
    """Coordinate descent, the record and the RTN guard of each of a job's weights."""
    out = []
    n = len(prep.items)
    for k, it in enumerate(prep.items):
        q, params = it.q, it.params
        moved = 0
        metric = job.out_metrics[k] if job.out_metrics else None
        sweeps = config.cd_sweeps if config.cd_sweeps is not None else (2 if metric is not None else 0)
        if sweeps and getattr(grid, "code_bits", None):  # a grid with codes to move (int, GGUF's linear grids)
            q, moved = coordinate_descent(it.ref, q, params, prep.h, grid, sweeps, metric, config.metric_weight)
        loss, kind = weight_loss(it.ref, q, prep.h0) if moved else (_h0_loss(prep, it), "hessian")
        reason = "act-order, static groups" if config.act_order else ""
        if moved:
            reason = (reason + "; " if reason else "") + f"{moved} codes moved by coordinate descent"
        if len(it.passes) > 1:
            reason = (reason + "; " if reason else "") + f"{len(it.passes)} passes (loss " + " -> ".join(
                f"{x:.4g}" for x in it.passes) + ")"
        record = QuantRecord(
            "gptq", reason, prep.damp, loss, kind,
            dead_columns=int(prep.dead.numel()), n_tokens=prep.n_tokens, gptq_loss=loss, shrink=prep.alpha or None,
        )
        result = QuantResult(q, params, record)
        if config.rtn_guard:
            refined = len(it.passes) > 1 and any(a is not b for a, b in zip(params, it.static_fit))
            grids = [it.static_fit] + ([params] if refined else [])
            result = _keep_better(result, it.w0, prep.h0, grid, prep.diag0 if config.use_importance else None,
                                  [(p, it.fitted_on) for p in grids] if prep.static else None,
                                  None if job.asym is None else it.ref)
        result.record.seconds = (time.perf_counter() - prep.t0) / n
        out.append(result)
    return out


@torch.no_grad()
def coordinate_descent(ref: torch.Tensor, q: torch.Tensor, params: list[Any], h: torch.Tensor, grid: Grid,
                       sweeps: int, metric: torch.Tensor | None = None, weight: float = 1.0,
                       block: int = 64, compiled: bool | None = None) -> tuple[torch.Tensor, int]:
    """Greedy +-1 code moves, column by column (all rows at once), that lower
    L = tr(D H D^T) + lam tr(A D H D^T A^T), D = q - ref, A = `metric` [k, rows] (lam = `weight` x the ratio of the
    two terms at the start, so that they begin equal; no metric: lam = 0). A move of entry (r, j) by d changes L by
    2 d (G_rj + lam A_r . K_j) + d^2 H_jj (1 + lam |A_r|^2) with G = D H, K = A G, both kept up to date: exactly
    within a block of `block` columns, for the other columns by one product per block (on a CPU: compiled, and
    rebuilt per block from the moves, quant.descent; `compiled`: None for that on a CPU and the torch loop
    elsewhere, False for the torch loop anywhere). Returns (q, number of moves)."""
    rows, cols = q.shape
    sl = group_slices(cols, grid.group_size)
    step = torch.cat([grid.code_steps(p, s.stop - s.start) for s, p in zip(sl, params)], dim=1)
    codes = torch.cat([grid.codes(q[:, s], p) for s, p in zip(sl, params)], dim=1)
    g = (q - ref) @ h
    lam, a, k = 0.0, None, None
    if metric is not None:
        a = metric.to(q)
        k = a @ g
        plain = float(((q - ref) * g).sum())
        routed = float(((a @ (q - ref)) * k).sum())
        lam = weight * plain / routed if routed > 0 else 0.0
    lo, hi = grid.code_range()
    if compiled is None:
        compiled = q.device.type == "cpu"
    if compiled:  # the same moves, compiled (quant.descent)
        q, codes, moved = descend(g, h, q, codes, step, a if lam else None, lam, lo, hi, sweeps, block)
    else:
        q, codes, moved = _descend_torch(g, k, a, lam, q.clone(), codes, step, h, lo, hi, sweeps, block)
    if moved:  # exactly what the codes dequantize to (finalize / the GGUF packer recover them)
        q = torch.cat([grid.quantize(grid.from_codes(codes[:, s], p), p) for s, p in zip(sl, params)], dim=1)
    return q, moved


def _descend_torch(g, k, a, lam, q, codes, step, h, lo, hi, sweeps: int, block: int):
    """coordinate_descent's column loop in torch ops (any device); returns (q, codes, moves)."""
    rows, cols = q.shape
    hd = h.diagonal()
    a_norm = (a.square().sum(0) if a is not None else torch.zeros(rows, device=q.device)) * lam
    moved = 0
    for _ in range(sweeps):
        n0 = moved
        for b0 in range(0, cols, block):
            # G and K are kept exact for the block's own columns move by move (gb, kb); the moves' effect on the
            # other columns is one product per block (GPTQ's lazy batch updates), not a row update per move
            b1 = min(cols, b0 + block)
            gb = g[:, b0:b1].clone()
            kb = k[:, b0:b1].clone() if a is not None else None
            hb = h[b0:b1, b0:b1]
            moves = torch.zeros(rows, b1 - b0, dtype=q.dtype, device=q.device)
            for j in range(b0, b1):
                jj = j - b0
                s = step[:, j]
                lin = gb[:, jj] if a is None else gb[:, jj] + lam * (a.t() @ kb[:, jj])
                quad = s * s * hd[j] * (1 + a_norm)
                up = 2 * s * lin + quad
                down = -2 * s * lin + quad
                go_up = (up < down) & (up < 0) & (codes[:, j] < hi)
                go_down = ~go_up & (down < 0) & (codes[:, j] > lo)
                idx = torch.nonzero(go_up | go_down).squeeze(1)
                if not idx.numel():
                    continue
                d = torch.where(go_up[idx], s[idx], -s[idx])
                if a is not None and lam and idx.numel() > 1:
                    # the metric term couples the rows: moves that each help can overshoot together; keep the most
                    # helpful half (then quarter, ...) until the joint change is a decrease: every prefix of the
                    # moves sorted by gain at once, from cumulative sums
                    gain = torch.where(go_up, up, down)[idx]  # the chosen move's change
                    keep = torch.argsort(gain)
                    ii, dd = idx[keep], d[keep]
                    n = ii.numel()
                    lens = [n]
                    while lens[-1] > 1:
                        lens.append(lens[-1] // 2)
                    lens = torch.tensor(lens[:-1], device=q.device) - 1  # prefix ends tested; length 1 needs no test
                    joint = (a[:, ii] * dd).cumsum(1)[:, lens].square().sum(0)
                    own = (a_norm[ii] / lam * dd * dd).cumsum(0)[lens]
                    change = gain[keep].cumsum(0)[lens] + lam * hd[j] * (joint - own)
                    ok = torch.nonzero(change < 0)
                    m = int(lens[ok[0, 0]]) + 1 if ok.numel() else 1
                    idx, d = ii[:m], dd[:m]
                q[idx, j] += d
                codes[idx, j] += torch.sign(d)
                moves[idx, jj] += d
                gb[idx] += d[:, None] * hb[jj][None, :]
                if a is not None:
                    kb += (a[:, idx] @ d)[:, None] * hb[jj][None, :]
                moved += int(idx.numel())
            if bool(moves.any()):
                g.addmm_(moves, h[b0:b1])
                if a is not None:
                    k.addmm_(a @ moves, h[b0:b1])
        if moved == n0:
            break
    return q, codes, moved


def _search_grid(grid: Grid, config: GPTQConfig) -> Grid:
    """The grid GPTQ fits group params with: `grid`, or a copy of it with the MSE search on (scale_search, int
    grids). Params and quantize are `grid`'s own, so the result finalizes on `grid` unchanged."""
    if config.scale_search and isinstance(grid, IntGrid) and grid.scheme.bits <= config.search_max_bits:
        searching = copy.copy(grid)
        searching.mse, searching.mse_steps, searching.max_shrink = True, max(1, config.search_steps), config.search_shrink
        return searching
    return grid



def _stack_rows(ps: list[Any], rows: list[int]) -> Any:
    """Group params of several items (item k has rows[k] rows) as one for grid.quantize on their stacked rows:
    every tensor field with one entry per row concatenated (IntParams, the GGUF FittedBlock/FixedParams,
    FP8Params, a bare tensor)."""
    if len(ps) == 1:
        return ps[0]
    p0 = ps[0]
    if isinstance(p0, torch.Tensor):
        return torch.cat(ps, 0)
    out = copy.copy(p0)
    for k, v in vars(p0).items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and all(getattr(p, k).shape[0] == r for p, r in zip(ps, rows)):
            object.__setattr__(out, k, torch.cat([getattr(p, k) for p in ps], 0))
    return out


def _gptq_pass(wT: torch.Tensor, factor: torch.Tensor, grid: Grid, params: list[list[Any]],
               importance: list[torch.Tensor | None], order: torch.Tensor | None, group: int, bs: int,
               rows: tuple[int, ...], keep_wt: bool = False,
               sub: int = 16) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One GPTQ sweep over J jobs at once. wT [J, C, N]: the start weights of each job's S items (weights sharing
    the job's Hessian; item s has rows[s] rows, N their sum), transposed, so that a column of every row of every
    item is one contiguous row; factor [J, C, C]: each job's R, upper triangular with R R^T = its damped Hessian
    Hd (in `order` if given: act-order, [C] for all jobs or [J, C], one per job, whose params the grid's
    column_params then picks column by column); params[item][g] (item = j * S + s): group params, None ones fitted
    lazily (natural order only) and filled in; importance[j]: the per-column weights handed to grid.fit.

    GPTQ is usually written with U = R^-1 (U^T U = Hd^-1): column j is rounded to q_j, its error
    e_j = (w'_j - q_j) / U_jj is pushed into the later columns as w'_k -= e_j U_jk, and W - Q = E U. Multiplying by
    R gives E = (W - Q) R, so the value column j is rounded from is w'_j = w_j + sum_{i<j} d_i R_ij / R_jj with
    d_i = w_i - q_i the finished columns' errors against the *original* weights: the same pushes, with R scaled by
    its diagonal in place of U and d in place of e, and no inverse. Each d reaches the next columns of its
    sub-block of `sub` columns as a rank-1 update, the rest of its block of `bs` columns after the sub-block and the
    columns after the block after the block, both as batched matrix products (two levels of GPTQ's lazy batch
    updates). Columns are rounded one at a time for all rows of all items (one grid.quantize call on the stacked
    params).
    Returns (q, the weights each column had when it was rounded (keep_wt), both [J, C, N] in natural column
    order, and each row's loss [J, N] float64: tr((W - Q) Hd (W - Q)^T) / 2 = sum_j e_j^2 / 2 with
    e_j = (w'_j - q_j) R_jj, accumulated on the way)."""
    J, C, N = wT.shape
    S = len(rows)
    offsets = [sum(rows[:k]) for k in range(S + 1)]
    item_rows = list(rows) * J
    permuted = order is not None
    per_job = permuted and order.dim() == 2 and J > 1 and not bool((order == order[:1]).all())
    if permuted and order.dim() == 2 and not per_job:
        order = order[0]
    if per_job:  # act-order jobs in one loop: each its own column order, params picked per job for every column
        w = torch.stack([wT[j, order[j]] for j in range(J)])
        job_columns = order.tolist()
        columns = job_columns[0]
        jobs = torch.arange(J, device=wT.device)

        def original(k: int) -> torch.Tensor:  # [J, N]: the original k-th column of GPTQ's order, every job
            return wT[jobs, order[:, k]]
    else:
        if permuted:
            w = wT[:, order]
            columns = order.tolist()
        else:
            w = wT.clone()
            columns = list(range(C))

        def original(k: int) -> torch.Tensor:
            return wT[:, columns[k]]
    rdiag = factor.diagonal(dim1=1, dim2=2)  # [J, C]
    scaled = factor / rdiag.unsqueeze(1)  # R_ij / R_jj
    qT = torch.empty_like(w)
    wtT = torch.empty_like(w) if keep_wt else None
    loss = torch.zeros(J, N, dtype=torch.float64, device=w.device)
    lazy = any(p is None for ps in params for p in ps)
    if lazy:
        sub = math.gcd(sub, group)
    stacked = {}

    def stack(g: int, k: int) -> None:  # group g's params for every item (k: the position of its column now)
        c = columns[k]
        for it, ps in enumerate(params):
            if ps[g] is None:  # lazily fitted (a group starts here, natural order): on the weights as updated
                j, s = divmod(it, S)
                cur = _group_start(w, wT, factor, j, k, group)[offsets[s]:offsets[s + 1]]
                imp = importance[j]
                ps[g] = grid.fit(cur, None if imp is None else imp[c:c + group])
        stacked[g] = _stack_rows([ps[g] for ps in params], item_rows)

    compiled = _compiled_columns(grid, w, per_job)
    if compiled is not None:
        aff = compiled
        per_group = 1 if not aff.sub else -(-group // aff.sub)
        tab_s = torch.zeros(J, -(-C // group) * per_group, N)
        tab_m = torch.zeros_like(tab_s)
        prow = np.array([(c // group) * per_group + aff.index(c % group) for c in columns], np.int64)
        cols_np = np.asarray(columns, np.int64)
        w_np, wT_np, q_np = w.numpy(), wT.numpy(), qT.numpy()
        wt_np = wtT.numpy() if keep_wt else q_np
        r_np, rd_np = scaled.numpy(), rdiag.contiguous().numpy()
        s_np, m_np = tab_s.numpy(), tab_m.numpy()
        qmin, qmax = np.float32(aff.qmin), np.float32(aff.qmax)
    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        n = i2 - i1
        W1 = w[:, i1:i2]
        R1 = scaled[:, i1:i2, i1:i2]
        D1 = torch.empty(J, n, N, dtype=w.dtype, device=w.device)  # the block's d_j
        E1 = torch.empty(J, n, N, dtype=w.dtype, device=w.device)  # the block's e_j
        if compiled is not None:
            e_np, d_np = E1.numpy(), D1.numpy()
        for j1 in range(0, n, sub):
            j2 = min(j1 + sub, n)
            if compiled is not None:
                for i in range(j1, j2):
                    g = columns[i1 + i] // group
                    if g not in stacked:
                        stack(g, i1 + i)
                        ts, tm = tables(aff, stacked[g])
                        rows_g = slice(g * per_group, g * per_group + ts.shape[0])
                        tab_s[:, rows_g] = ts.view(-1, J, N).transpose(0, 1)
                        tab_m[:, rows_g] = tm.view(-1, J, N).transpose(0, 1)
                for j in range(J):
                    round_sub_block(w_np[j], wT_np[j], cols_np, r_np[j], rd_np[j], s_np[j], m_np[j], prow, aff.mode,
                                    qmin, qmax, i1, j1, j2, q_np[j], e_np[j], d_np[j], wt_np[j], keep_wt)
                if j2 < n:
                    W1[:, j2:].baddbmm_(R1[:, j1:j2, j2:].transpose(1, 2), D1[:, j1:j2])
                continue
            for i in range(j1, j2):
                col = W1[:, i]
                if per_job:
                    picked = []
                    for j in range(J):
                        g, offset = divmod(job_columns[j][i1 + i], group)
                        picked += [grid.column_params(params[j * S + s][g], offset) for s in range(S)]
                    qc = grid.quantize(col.reshape(J * N, 1), _stack_rows(picked, item_rows), 0).view(J, N)
                else:
                    c = columns[i1 + i]
                    g, offset = divmod(c, group)
                    if g not in stacked:
                        stack(g, i1 + i)
                    qc = grid.quantize(col.reshape(J * N, 1), stacked[g], offset).view(J, N)
                if keep_wt:
                    wtT[:, i1 + i] = col
                qT[:, i1 + i] = qc
                torch.sub(col, qc, out=E1[:, i]).mul_(rdiag[:, i1 + i].unsqueeze(1))
                d = D1[:, i]
                torch.sub(original(i1 + i), qc, out=d)
                if i + 1 < j2:
                    W1[:, i + 1:j2].baddbmm_(R1[:, i, i + 1:j2].unsqueeze(2), d.unsqueeze(1))
            if j2 < n:
                W1[:, j2:].baddbmm_(R1[:, j1:j2, j2:].transpose(1, 2), D1[:, j1:j2])
        loss += E1.square().sum(1, dtype=torch.float64)
        if i2 < C:
            w[:, i2:].baddbmm_(scaled[:, i1:i2, i2:].transpose(1, 2), D1)
    if per_job:
        inv = torch.argsort(order, dim=1)
        qT = torch.stack([qT[j, inv[j]] for j in range(J)])
        if keep_wt:
            wtT = torch.stack([wtT[j, inv[j]] for j in range(J)])
    elif permuted:
        inv = torch.argsort(order)
        qT = qT[:, inv]
        if keep_wt:
            wtT = wtT[:, inv]
    return qT, wtT, loss / 2


def _compiled_columns(grid: Grid, w: torch.Tensor, per_job: bool) -> Affine | None:
    """The affine rounding the compiled sub-block steps (quant.columns) use for this pass, or None for the torch
    loop: on a GPU, for per-job act-order loops, other dtypes and grids without an affine rounding."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or per_job or not COMPILED_COLUMNS:
        return None
    return affine_grid(grid)


def _group_start(w: torch.Tensor, wT: torch.Tensor, factor: torch.Tensor, j: int, p: int, group: int) -> torch.Tensor:
    """Job j's weights [N, group] of the group whose first column is p (natural order: lazy groups), as GPTQ's
    usual form (pushing every error through U = R^-1) has them there: what a lazily fitted group is fitted on. That
    state is the least-squares completion of the rounded columns, W_g + d R[:p, g] R[g, g]^-1, where the pushes
    through R scaled by its diagonal have added d R[:p, k] / R_kk to each column k (w holds that): the difference
    times R_kk, through the small triangular inverse of the group's own block of R."""
    end = min(p + group, w.shape[1])
    orig = wT[j, p:end]
    pulled = (w[j, p:end] - orig) * factor[j].diagonal()[p:end].unsqueeze(1)  # d R[:p, g], [g, N]
    eye = torch.eye(end - p, dtype=w.dtype, device=w.device)
    u = torch.linalg.solve_triangular(factor[j, p:end, p:end], eye, upper=True)  # R[g, g]^-1
    return (orig + u.t() @ pulled).t()


#: GPTQ's loss below this fraction of plain RTN's: the other RTN candidates are not computed (each costs a
#: [rows x in x in] product; RTN on GPTQ's own grid is a few % better than plain RTN, never 20 %)
CLEAR_WIN = 0.8

#: the compiled sub-block column steps (quant.columns) on CPUs; False: the torch loop everywhere (tests compare them)
COMPILED_COLUMNS = True

#: A weight of at least SAMPLE_MIN_ROWS rows on a grid whose rows are independent first estimates plain RTN's loss
#: from SAMPLE_ROWS of its rows (_sampled_rtn_loss): when GPTQ's exact loss is below SAMPLED_WIN x the estimate,
#: that decides (rtn_loss is the estimate, rtn_rows says so) and RTN is not fitted on the other rows nor multiplied
#: through H; otherwise the guard runs on all rows as before. An expert's gate/up/down have 5,120-8,192 rows: the
#: full guard costs about a third of their GPTQ time, the sample an eighth of that.
SAMPLE_MIN_ROWS = 4096
SAMPLE_ROWS = 1024
SAMPLE_TOP = 128
SAMPLED_WIN = 0.7


def rtn_candidates(
    w0: torch.Tensor,
    h0: torch.Tensor,
    grid: Grid,
    importance: torch.Tensor | None = None,
    static: tuple[list[Any], torch.Tensor] | list[tuple[list[Any], torch.Tensor]] | None = None,
    reference: torch.Tensor | None = None,
    plain: QuantResult | None = None,
    plain_only: bool = False,
) -> list[tuple[str, QuantResult]]:
    """Round-to-nearest candidates for `w0` on `grid`, each with its Hessian loss against h0 in the record:

    "rtn": a plain fit, what an uncalibrated run writes (`plain`: already computed);
    "rtn on the gptq grid": static = (params, weights they were fitted on: w0, or w0 with GPTQ's zeroed dead
      columns), or a list of such pairs (the first fit and the refined params), those weights rounded onto
      exactly the grid GPTQ used (no second search); without `static`,
      "importance-weighted rtn": a fit weighted by `importance`.
    reference: what the losses are measured against (default w0; GPTQ's W* under asymmetric calibration).
    plain_only: only the first.
    """
    target = w0 if reference is None else reference

    def measured(res: QuantResult) -> QuantResult:
        res.record.loss, res.record.loss_kind = weight_loss(target, res.weight, h0)
        return res

    out = [("rtn", plain if plain is not None else measured(rtn(w0, grid)))]
    if plain_only:
        return out
    if static is not None:
        for static_params, fitted_on in ([static] if isinstance(static, tuple) else static):
            t0 = time.perf_counter()
            sl = group_slices(w0.shape[1], grid.group_size)
            q = torch.cat([grid.quantize(fitted_on[:, s], p, 0) for s, p in zip(sl, static_params)], dim=1)
            res = measured(QuantResult(q, list(static_params), QuantRecord("rtn", "", None)))
            res.record.seconds = time.perf_counter() - t0
            out.append(("rtn on the gptq grid", res))
    elif importance is not None:
        out.append(("importance-weighted rtn", measured(rtn(w0, grid, importance=importance))))
    return out


def _sampled_rtn_loss(w0: torch.Tensor, h0: torch.Tensor, grid: Grid,
                      reference: torch.Tensor | None = None) -> tuple[float, int] | None:
    """Plain RTN's Hessian loss on `w0` estimated from SAMPLE_ROWS rows, and the rows used; None when the weight has
    fewer than SAMPLE_MIN_ROWS rows or the grid's fit couples rows (fp8 per-tensor or block scales).

    Rows are ranked by a proxy of their rounding error, |w_r|^2 weighted by diag(H) (rounding steps grow with the
    row's magnitude, and an input's energy weighs its column): the SAMPLE_TOP largest are measured exactly, and of
    the others every k-th in proxy order (a systematic sample spread over the whole range of the proxy), scaled up
    by the ratio of the proxy's sum over all of them to its sum over the sample (a ratio estimator: exact when the
    loss is proportional to the proxy). A row's RTN result is the whole weight's, so the sampled rows' losses are
    exact; only the rows not sampled are estimated."""
    rows = w0.shape[0]
    if rows < SAMPLE_MIN_ROWS or not getattr(grid, "rows_independent", False):
        return None
    target = w0 if reference is None else reference
    top, picked, scale = row_sample(w0.square() @ h0.diagonal().clamp(min=0).to(w0), SAMPLE_ROWS, SAMPLE_TOP)
    idx = torch.cat([top, picked])
    delta = target[idx] - rtn(w0[idx], grid).weight
    return hessian_loss(delta[: top.numel()], h0) + scale * hessian_loss(delta[top.numel():], h0), int(idx.numel())


def _keep_better(result: QuantResult, w0: torch.Tensor, h0: torch.Tensor, grid: Grid,
                 importance: torch.Tensor | None, static: list[tuple[list[Any], torch.Tensor]] | None,
                 reference: torch.Tensor | None = None) -> QuantResult:
    """`result` (GPTQ's), or the RTN candidate with a strictly lower Hessian loss; both losses recorded. When GPTQ's
    loss is below SAMPLED_WIN x plain RTN's estimate from a sample of rows, or below CLEAR_WIN x plain RTN's exact
    loss, that is the RTN loss recorded and the other candidates are skipped."""
    rec = result.record
    sampled = _sampled_rtn_loss(w0, h0, grid, reference)
    if sampled is not None and rec.loss < SAMPLED_WIN * sampled[0]:
        rec.rtn_loss, rec.rtn_rows = sampled
        return result
    (_, plain), = rtn_candidates(w0, h0, grid, reference=reference, plain_only=True)
    if rec.loss < CLEAR_WIN * plain.record.loss:
        rec.rtn_loss = plain.record.loss
        return result
    cands = rtn_candidates(w0, h0, grid, importance, static, reference, plain=plain)
    name, best = min(cands, key=lambda c: c[1].record.loss)
    rec.rtn_loss = best.record.loss
    if not best.record.loss < rec.loss:
        return result
    kept = best.record
    kept.reason = f"{name} had lower Hessian loss than gptq ({kept.loss:.6g} < {rec.loss:.6g})"
    kept.damp, kept.dead_columns, kept.n_tokens = rec.damp, rec.dead_columns, rec.n_tokens
    kept.gptq_loss, kept.rtn_loss, kept.shrink = rec.gptq_loss, kept.loss, rec.shrink
    return best
