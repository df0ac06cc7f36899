"""Each preference loss equals its published formula (preference-training.md §2b) on hand-picked inputs."""
import math

import pytest
import torch

from tunesmith.train.ops import losses as L

BETA, EPS = 0.3, 0.1
# summed log-probs of two pairs: policy chosen/rejected, reference chosen/rejected, completion lengths
C, R = [-12.0, -30.5], [-15.0, -28.0]
RC, RR = [-13.5, -29.0], [-14.0, -29.5]
NC, NR = [4.0, 10.0], [5.0, 8.0]


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def expected(loss_type):
    out = []
    for c, r, rc, rr, nc, nr in zip(C, R, RC, RR, NC, NR):
        a, b = c - rc, r - rr          # r_c, r_r
        h = a - b
        x = BETA * h
        out.append({
            "sigmoid": -(1 - EPS) * logsig(x) - EPS * logsig(-x),
            "ipo": ((a / nc - b / nr) - 1 / (2 * BETA)) ** 2,
            "hinge": max(0.0, 1 - x),
            "robust": (-(1 - EPS) * logsig(x) + EPS * logsig(-x)) / (1 - 2 * EPS),
            "exo_pair": sig(x) * (logsig(x) - math.log(1 - EPS)) + sig(-x) * (logsig(-x) - math.log(EPS)),
            "nca_pair": -logsig(BETA * a) - 0.5 * logsig(-BETA * a) - 0.5 * logsig(-BETA * b),
            "bco_pair": -logsig(BETA * a) - logsig(-BETA * b),
            "sppo_hard": (a - 1 / (2 * BETA)) ** 2 + (b + 1 / (2 * BETA)) ** 2,
            "apo_zero": (1 - sig(BETA * a)) + sig(BETA * b),
            "apo_down": sig(BETA * a) + (1 - sig(BETA * (a - b))),
            "discopop": (1 - sig(x / 0.05)) * -logsig(x) + sig(x / 0.05) * math.exp(-x),
        }[loss_type])
    return out


@pytest.mark.parametrize("loss_type", [t for t in L.DPO_LOSS_TYPES if t != "sft"])
def test_dpo_variant_matches_formula(loss_type):
    got = L.dpo_loss(loss_type, chosen=t(C), rejected=t(R), ref_chosen=t(RC), ref_rejected=t(RR),
                     chosen_len=t(NC), rejected_len=t(NR), beta=BETA, label_smoothing=EPS, discopop_tau=0.05)
    assert got.tolist() == pytest.approx(expected(loss_type), abs=1e-6)


def test_dpo_sigmoid_without_smoothing_is_minus_logsigmoid_and_ln2_at_zero():
    assert L.dpo_sigmoid(t([0.0]), 0.1).item() == pytest.approx(math.log(2), abs=1e-12)
    assert L.dpo_sigmoid(t([2.0]), 0.5).item() == pytest.approx(-logsig(1.0), abs=1e-12)


def test_cpo_simpo_orpo_match_formulas():
    gamma = 0.5
    for c, r, nc, nr in zip(C, R, NC, NR):
        assert L.cpo(t([c]), t([r]), BETA).item() == pytest.approx(-logsig(BETA * (c - r)), abs=1e-6)
        ac, ar = c / nc, r / nr
        # SimPO: -log σ(β(avg_c − avg_r) − γ)
        assert L.simpo(t([ac]), t([ar]), BETA, gamma).item() == pytest.approx(-logsig(BETA * (ac - ar) - gamma), abs=1e-6)
        # ORPO: log OR = (avg_c − avg_r) − (log(1 − e^avg_c) − log(1 − e^avg_r)); term = −λ log σ(log OR)
        log_or = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        assert L.orpo_log_odds(t([ac]), t([ar])).item() == pytest.approx(log_or, abs=1e-6)
        assert L.orpo(t([ac]), t([ar]), BETA).item() == pytest.approx(-BETA * logsig(log_or), abs=1e-6)


def test_kto_matches_formula():
    r = t([0.8, -0.4, 0.3])
    desirable = torch.tensor([True, False, False])
    kl, wd, wu = 0.2, 1.5, 0.7
    got = L.kto(r, desirable, t([kl])[0], BETA, wd, wu).tolist()
    want = [wd * (1 - sig(BETA * (0.8 - kl))), wu * (1 - sig(BETA * (kl + 0.4))), wu * (1 - sig(BETA * (kl - 0.3)))]
    assert got == pytest.approx(want, abs=1e-6)
