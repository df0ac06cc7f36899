"""The last position's output of a decoding step, and the greedy arg-max over the output layer.

`LastOutput` holds either a step's logits [B, V] or its hidden states [B, H] with the output weight applied here.
Greedy rows then never materialise their [rows x vocabulary] logits: the arg-max is taken chunk by chunk of the
vocabulary, in the weight's own dtype — or, for a float32 weight on a CPU with native bfloat16 dot products
(AVX512-BF16 or AMX), through `OutputScreen`: a bfloat16 product ranks the vocabulary (about 2.4x faster than
float32 at Qwen's 151,936 rows) and a rigorous bound on its error says which tokens could still be the float32
arg-max; those are rescored in float32. The token chosen is the float32 arg-max: the same dot products as the model's
head, up to float summation order (as in any change of batch shape), ties to the lowest id as `torch.argmax`.

torch is imported inside the functions that use it.
"""
from __future__ import annotations

from typing import Optional

CHUNK = 16384        # vocabulary rows per product: [B x 16,384] scores stay in cache for the reductions
BLOCK = 32           # the screen keeps the largest bfloat16 score of each block of 32 vocabulary rows
SCREEN_BLOCKS = 4    # blocks per row rescored in float32 before the bound is checked
_PROBE_ROWS = 64     # weight rows compared every step to notice weights changed in place
SCREEN_MIN_VOCAB = 4096  # below this the float32 product is cheap and the screen would not pay


class LastOutput:
    """A decoding step's last-position output: logits [B, V] (float32), or hidden states [B, H] with the output
    weight [V, H] applied here. banned: token ids never chosen (a vision model's picture placeholders)."""

    def __init__(self, logits=None, hidden=None, banned: tuple = (), screen: Optional["OutputScreen"] = None):
        self.logits, self.hidden, self.banned, self.screen = logits, hidden, banned, screen
        if logits is not None and banned:
            self.logits[:, list(banned)] = float("-inf")

    def argmax(self, rows: list[int], head):
        """Greedy tokens [len(rows)] (int64); ties go to the lowest id, as torch.argmax does.

        rows: indices into the batch; head: (decoder, output weight [V, H]) from `models.head.chunked_head`, used
        only when this holds hidden states."""
        if self.logits is not None:
            sub = self.logits if len(rows) == self.logits.shape[0] else self.logits[rows]
            return sub.argmax(-1)
        weight, hidden = head[1], self.hidden[rows]
        if self.screen is not None and self.screen.usable(weight):
            return self.screen.argmax(hidden, weight, self.banned)
        return chunked_argmax(hidden.to(weight.dtype), weight, self.banned)

    def logits_of(self, rows: list[int], head):
        """Full logits [len(rows), V] (float32) for rows that sample or report log-probs; rows and head as `argmax`."""
        if self.logits is not None:
            return self.logits[rows]
        weight = head[1]
        logits = head_product(self.hidden[rows].to(weight.dtype), weight).float()
        if self.banned:
            logits[:, list(self.banned)] = float("-inf")
        return logits


TALL_MAX_ROWS = 32  # up to this many rows a float32 head product runs faster as (weight @ hidden.T).T on a CPU


def _tall(hidden, weight) -> bool:
    """Whether hidden @ weight.T should run as the tall product weight @ hidden.T: a float32 weight on a CPU and
    2-TALL_MAX_ROWS rows, where oneDNN runs the tall product about 2.5x faster than the wide one (8 rows at a
    151,936-row vocabulary: 50 → 19 ms for hidden 512); from 64 rows on the two are within noise, and the
    transposed result's copy no longer pays."""
    import torch

    return weight.dtype == torch.float32 and weight.device.type == "cpu" and 2 <= hidden.shape[0] <= TALL_MAX_ROWS


def head_product(hidden, weight):
    """hidden [b, H] @ weight[V, H].T, [b, V] (contiguous) in the weight's dtype: the same dot products, up to float
    summation order, computed as the tall product where that is faster (`_tall`)."""
    import torch

    if _tall(hidden, weight):
        return torch.matmul(weight, hidden.T).T.contiguous()
    return hidden @ weight.T


def chunked_argmax(hidden, weight, banned: tuple = (), chunk: int = CHUNK):
    """arg-max over the vocabulary of hidden [b, H] @ weight[V, H].T, [b] int64, one chunk of `chunk` rows at a
    time in the weight's dtype (scores compared in float32); banned ids never win; ties to the lowest id."""
    import torch

    best_val = best_idx = None
    for start in range(0, weight.shape[0], chunk):
        part = weight[start:start + chunk]
        tall = _tall(hidden, part)
        scores = (torch.matmul(part, hidden.T) if tall else hidden @ part.T).float()  # [chunk, b] when tall
        inside = [t - start for t in banned if start <= t < start + chunk]
        if inside:
            scores[(inside, slice(None)) if tall else (slice(None), inside)] = float("-inf")
        vals, idx = scores.max(0 if tall else -1)
        idx = idx + start
        if best_val is None:
            best_val, best_idx = vals, idx
        else:
            better = vals > best_val  # strictly: an equal later score keeps the earlier (lower) id
            best_val, best_idx = torch.where(better, vals, best_val), torch.where(better, idx, best_idx)
    return best_idx


def native_bfloat16(device) -> bool:
    """True on a CPU whose instructions multiply bfloat16 natively (AVX512-BF16 or AMX tiles), where a bfloat16
    product runs about 2.4x faster than a float32 one; elsewhere bfloat16 is emulated and the screen would not pay."""
    import torch

    if device.type != "cpu":
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPUID probes (private API)
    return any(hasattr(cpu, name) and getattr(cpu, name)() for name in checks)


class OutputScreen:
    """Exact greedy arg-max of a float32 output layer through a bfloat16 product.

    For every vocabulary row j the bfloat16 score ŝ_j (inputs rounded to bfloat16, products accumulated in float32,
    the result rounded to bfloat16) differs from the float32 score f_j by at most

        E = 1.5 · (2u + u² + 2γ(1+u)² + u(1+u)²(1+γ)/(1-u)) · A,   u = 2⁻⁸, γ = H·2⁻²⁴ / (1 - H·2⁻²⁴),

    where A ≥ Σ_k |h_k|·|W_jk| for every j: min(‖h‖₂·max_j ‖W_j‖₂, ‖h‖∞·max_j ‖W_j‖₁) (Cauchy–Schwarz, Hölder); the
    terms are the rounding of h and W to bfloat16, the float32 accumulation of both products (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., eq. 3.5) and the rounding of the result; 1.5 covers a kernel that
    rounds a partial sum once more. The screen keeps each block's largest ŝ, rescores in float32 every token of the
    `SCREEN_BLOCKS` best blocks, and takes the best of them, F. A token outside those blocks has f_j ≤ ŝ_j + E ≤
    (the next block's largest ŝ) + E; when that is below F no token outside can win, so the rescored best is the
    float32 arg-max. When it is not (near-ties within E), every block whose largest ŝ reaches F - E is rescored.

    The bfloat16 copy (half the weight's bytes) is made on first use and made again when the weight changes (another
    tensor, an in-place update, or other values in a probe of its rows), e.g. full-weight pushes to a rollout server.
    """

    def __init__(self):
        self._key = None
        self._probe = None
        self._weight16 = None
        self._norm2 = self._norm1 = 0.0
        self._banned_cache: dict = {}

    @staticmethod
    def usable(weight) -> bool:
        """Whether the screen applies: a float32 weight of at least SCREEN_MIN_VOCAB rows on a CPU that multiplies
        bfloat16 natively."""
        import torch

        return (weight.dtype == torch.float32 and weight.shape[0] >= SCREEN_MIN_VOCAB
                and native_bfloat16(weight.device))

    def argmax(self, hidden, weight, banned: tuple = ()):
        """Greedy tokens [b] (int64) of hidden [b, H] (float32) against weight [V, H] (float32): equal to
        `chunked_argmax(hidden, weight, banned)` up to float summation order. Rows must be finite (the engine
        ends rows with NaN/inf before choosing)."""
        import torch

        if not self._refresh(weight):  # NaN/inf in the weight: no bound holds
            return chunked_argmax(hidden, weight, banned)
        hidden = hidden.float()
        maxes = self._block_maxes(hidden, banned)                       # [b, blocks]
        k = min(SCREEN_BLOCKS, maxes.shape[1] - 1)
        top, blocks = maxes.topk(k + 1, dim=-1)
        tokens = (blocks[:, :k, None] * BLOCK + torch.arange(BLOCK)).flatten(1)   # [b, k·BLOCK]
        exact = self._rescore(hidden, weight, tokens, banned)
        best = exact.amax(-1)
        error = self._error_bound(hidden)
        choice = torch.where(exact == best[:, None], tokens, weight.shape[0]).amin(-1)
        for r in (~(top[:, k] + error < best)).nonzero().flatten().tolist():
            choice[r] = self._settle(hidden[r], weight, maxes[r], best[r] - error[r], banned)
        return choice

    # ------------------------------------------------------------------ parts

    def _refresh(self, weight) -> bool:
        """Make the bfloat16 copy and the norms when the weight is new or changed; False when it is not finite."""
        import math

        import torch

        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if self._key == key and (self._weight16 is None
                                 or torch.equal(weight[self._probe_rows(weight)], self._probe)):
            return self._weight16 is not None
        with torch.no_grad():
            w = weight.detach()
            self._norm2 = float(w.norm(dim=1).max())
            self._norm1 = float(w.abs().sum(dim=1).max())
            finite = math.isfinite(self._norm1) and math.isfinite(self._norm2)
            self._weight16 = w.to(torch.bfloat16) if finite else None
            self._probe = w[self._probe_rows(w)].clone()
        self._key = key
        self._banned_cache = {}
        return finite

    @staticmethod
    def _probe_rows(weight):
        import torch

        v = weight.shape[0]
        return torch.linspace(0, v - 1, min(_PROBE_ROWS, v)).long()

    def _block_maxes(self, hidden, banned: tuple):
        """The largest bfloat16 score of each block of BLOCK vocabulary rows, [b, ceil(V / BLOCK)] float32; banned
        ids and the padding past V count as -inf."""
        import torch

        h16, w16 = hidden.to(torch.bfloat16), self._weight16
        vocab, out = w16.shape[0], []
        for start in range(0, vocab, CHUNK):
            scores = (h16 @ w16[start:start + CHUNK].T).float()
            inside = [t - start for t in banned if start <= t < start + CHUNK]
            if inside:
                scores[:, inside] = float("-inf")
            n = scores.shape[1]
            if n % BLOCK:
                scores = torch.nn.functional.pad(scores, (0, BLOCK - n % BLOCK), value=float("-inf"))
            out.append(scores.view(scores.shape[0], -1, BLOCK).amax(-1))
        return torch.cat(out, dim=1)

    def _rescore(self, hidden, weight, tokens, banned: tuple):
        """float32 scores [b, n] of hidden [b, H] for tokens [b, n]; ids past the vocabulary and banned ids -inf."""
        import torch

        vocab = weight.shape[0]
        scores = torch.einsum("bh,bnh->bn", hidden, weight[tokens.clamp(max=vocab - 1)])
        invalid = tokens >= vocab
        if banned:
            invalid |= self._banned_mask(banned, vocab)[tokens.clamp(max=vocab - 1)]
        return scores.masked_fill(invalid, float("-inf"))

    def _banned_mask(self, banned: tuple, vocab: int):
        import torch

        if banned not in self._banned_cache:
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[list(banned)] = True
            self._banned_cache[banned] = mask
        return self._banned_cache[banned]

    def _error_bound(self, hidden):
        """E per row [b]: the most a bfloat16 score can differ from the float32 one (the class docstring)."""
        h = hidden.shape[1]
        u, gamma = 2.0 ** -8, h * 2.0 ** -24 / (1 - h * 2.0 ** -24)
        c = 1.5 * (2 * u + u * u + 2 * gamma * (1 + u) ** 2 + u * (1 + u) ** 2 * (1 + gamma) / (1 - u))
        a = (hidden.norm(dim=1) * self._norm2).minimum(hidden.abs().amax(dim=1) * self._norm1)
        return c * a * (1 + 2.0 ** -20) + 2.0 ** -100  # the last terms: the rounding of this bound itself

    def _settle(self, h, weight, maxes, floor, banned: tuple) -> int:
        """One row whose screen was not conclusive: rescore every block whose largest bfloat16 score reaches
        `floor` (= F - E) and return the float32 arg-max among them."""
        import torch

        blocks = (maxes >= floor).nonzero().flatten()
        tokens = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[None]
        exact = self._rescore(h[None], weight, tokens, banned)[0]
        best = exact.max()
        return int(torch.where(exact == best, tokens[0], weight.shape[0]).min())
