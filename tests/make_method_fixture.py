"""Regenerate tests/fixtures/method_losses.json: the loss terms of every method on fixed random
inputs, computed by float64 NumPy implementations of each formula, written from the papers
(and, for the `_seed003` forms, from seed 003's notebook), with no kdsweep or torch code.

    python tests/make_method_fixture.py    # rewrites the fixture; commit it with the formula change

tests/test_method_fixture.py runs every registered method on the same inputs and compares, so a
change to any formula shows up as a failing test until the fixture is deliberately regenerated.
The inputs are not stored: `case_inputs` draws them from each case's seed with NumPy's legacy
RandomState (its stream is frozen across NumPy versions); the fixture keeps their checksum.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "method_losses.json"
B, CLASSES = 6, 10
CRD_DIM, CRD_N, CRD_K = 128, 20, 15  # the fixture's bank size and negatives (the method's K is 16384)

# ---------------------------------------------------------------- the cases

LOGIT_CASE = {"s_feature": [3, 4, 4], "t_feature": [5, 4, 4], "s_embedding": [7], "t_embedding": [9]}
MAP_CASES = {  # student map, teacher map
    "same_size": ([3, 4, 4], [5, 4, 4]),
    "student_twice": ([3, 4, 4], [5, 2, 2]),
    "student_half": ([3, 2, 2], [5, 4, 4]),
    "student_larger": ([3, 5, 5], [5, 3, 3]),
    "student_smaller": ([3, 3, 3], [5, 5, 5]),
}
HP = {
    "ce": {},
    "vanilla_kd": {"temperature": 4.0, "alpha": 0.7},
    "hard_label": {"beta": 0.7},
    "logit_l2": {"weight": 1.0},
    "focal_kd": {"temperature": 4.0, "weight": 1.0, "gamma": 2.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
    "dist": {"beta": 2.0, "gamma": 2.0, "temperature": 4.0},
    "cosine": {"weight": 1.0},
    "sp": {"gamma": 3000.0},
    "feature_mse": {"weight": 50.0},
    "attention": {"beta": 1000.0},
    "attention_seed003": {"beta": 250.0},
    "fitnet": {"weight": 100.0},
    "fitnet_seed003": {"weight": 1.0},
    "rkd": {"w_dist": 25.0, "w_angle": 50.0},
    "rkd_seed003": {"w_dist": 25.0, "w_angle": 50.0},
    "pkt": {"weight": 30000.0},
    "pkt_seed003": {"weight": 2.0, "sigma": 0.1},
    "crd": {"weight": 0.8},
    "crd_seed003": {"weight": 1.0, "tau": 0.07},
}


def _fitnet_conv(s, t):
    """The paper form's regressor conv: (kind, weight shape, stride, padding)."""
    (cs, hs, ws), (ct, ht, wt) = s, t
    if (hs, ws) == (2 * ht, 2 * wt):
        return "conv", [ct, cs, 3, 3], 2, 1
    if (2 * hs, 2 * ws) == (ht, wt):
        return "transposed", [cs, ct, 4, 4], 2, 1
    if hs >= ht and ws >= wt:
        return "conv", [ct, cs, 1 + hs - ht, 1 + ws - wt], 1, 0
    return "transposed", [cs, ct, 1 + ht - hs, 1 + wt - ws], 1, 0


def head_params(method: str, s: list[int], t: list[int]) -> dict[str, list[int]]:
    """Names and shapes of a method's trainable heads (what the fixture loads into the module)."""
    if method == "fitnet":
        return {"regressor.0.weight": _fitnet_conv(s, t)[1], "regressor.1.weight": [t[0]], "regressor.1.bias": [t[0]]}
    if method == "fitnet_seed003":
        return {"regressor.weight": [t[0], s[0], 3, 3], "regressor.bias": [t[0]]}
    if method == "feature_mse":
        return {"proj.0.weight": [t[0], s[0], 1, 1], "proj.1.weight": [t[0]], "proj.1.bias": [t[0]]}
    if method in ("crd", "crd_seed003"):
        return {"proj_s.weight": [CRD_DIM, s[0]], "proj_s.bias": [CRD_DIM], "proj_t.weight": [CRD_DIM, t[0]], "proj_t.bias": [CRD_DIM]}
    return {}


def cases() -> list[dict]:
    out = []

    def add(method, name, shapes, epochs=4, epoch=0, steps=1):
        seed = 1000 + len(out)
        params = head_params(method, shapes["s_embedding"] if method.startswith("crd") else shapes["s_feature"],
                             shapes["t_embedding"] if method.startswith("crd") else shapes["t_feature"])
        out.append({"method": method, "case": name, "seed": seed, **shapes, "hp": HP[method], "epochs": epochs,
                    "epoch": epoch, "steps": steps, "params": params})

    for m in ("ce", "vanilla_kd", "hard_label", "logit_l2", "focal_kd", "dist", "cosine", "rkd", "rkd_seed003", "pkt",
              "pkt_seed003", "crd_seed003"):
        add(m, "default", LOGIT_CASE)
    add("crd", "two_steps", LOGIT_CASE, steps=2)
    add("dkd", "no_warmup", LOGIT_CASE, epochs=4, epoch=0)  # ceil(4 * 20/240) = 1: full weight
    add("dkd", "warmup", LOGIT_CASE, epochs=240, epoch=4)  # the paper's schedule: 5/20 in the 5th epoch
    for m in ("sp", "feature_mse", "attention", "attention_seed003", "fitnet", "fitnet_seed003"):
        for name, (s, t) in MAP_CASES.items():
            add(m, name, {**LOGIT_CASE, "s_feature": s, "t_feature": t}, epochs=4, epoch=0)
    return out


def _f32(a):
    """Values float32 can hold exactly, so the module sees the very inputs the reference does."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def case_inputs(case: dict) -> list[dict]:
    """Per step: s/t taps, labels, head params (first step) and, for crd, its bank state and columns."""
    rs = np.random.RandomState(case["seed"])
    steps = []
    for i in range(case["steps"]):
        step = {
            "s_logits": _f32(3 * rs.randn(B, CLASSES)), "t_logits": _f32(3 * rs.randn(B, CLASSES)),
            "s_feature": _f32(rs.randn(B, *case["s_feature"])), "t_feature": _f32(rs.randn(B, *case["t_feature"])),
            "s_embedding": _f32(rs.randn(B, *case["s_embedding"])), "t_embedding": _f32(rs.randn(B, *case["t_embedding"])),
            "y": rs.randint(0, CLASSES, B),
        }
        if case["method"] == "crd":
            step["ids"] = rs.choice(CRD_N, B, replace=False)
            step["cols"] = np.concatenate([step["ids"][:, None], rs.randint(0, CRD_N, (B, CRD_K))], 1)
        steps.append(step)
    steps[0]["params"] = {k: _f32(0.3 * rs.randn(*shape)) for k, shape in sorted(case["params"].items())}
    if case["method"] == "crd":
        a = math.sqrt(3 / CRD_DIM)
        steps[0]["memory_s"] = _f32(rs.uniform(-a, a, (CRD_N, CRD_DIM)))
        steps[0]["memory_t"] = _f32(rs.uniform(-a, a, (CRD_N, CRD_DIM)))
    return steps


def checksum(steps: list[dict]) -> float:
    total = 0.0
    for step in steps:
        for k, v in step.items():
            for a in (v.values() if isinstance(v, dict) else [v]):
                total += float(np.sum(np.abs(a) * 1.0))
    return total


# ---------------------------------------------------------------- float64 building blocks


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def ce(z, y):
    return float(-np.mean(log_softmax(z)[np.arange(len(y)), y]))


def kl_rows(p, q):
    """Mean over rows of KL(p || q)."""
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), 1)))


def unit(v, eps=0.0):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), eps)


def flat(a):
    return a.reshape(len(a), -1)


def adaptive_avg(v, n, axis):
    """Adaptive average pooling along one axis: bin i covers [floor(i L / n), ceil((i + 1) L / n))."""
    L = v.shape[axis]
    return np.concatenate([np.take(v, range(math.floor(i * L / n), math.ceil((i + 1) * L / n)), axis).mean(axis, keepdims=True)
                           for i in range(n)], axis)


def pool2(f, hw):
    return adaptive_avg(adaptive_avg(f, hw[0], 2), hw[1], 3)


def smaller_hw(a, b):
    return min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def huber(a, b):
    d = np.abs(a - b)
    return float(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))


def conv2d(x, w, stride=1, pad=0, bias=None):
    """Cross-correlation as torch's Conv2d: w (out, in, kh, kw)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, :, i, j] = np.einsum("bcij,ocij->bo", patch, w)
    return out if bias is None else out + bias[None, :, None, None]


def conv_transpose2d(x, w, stride=1, pad=0):
    """torch's ConvTranspose2d: w (in, out, kh, kw); every input pixel scatters a weighted kernel, then `pad` is cropped."""
    kh, kw = w.shape[2:]
    h, wd = x.shape[2:]
    out = np.zeros((x.shape[0], w.shape[1], (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            out[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw] += np.einsum("bc,coij->boij", x[:, :, i, j], w)
    return out[:, :, pad : out.shape[2] - pad, pad : out.shape[3] - pad]


def batch_norm_train(x, gamma, beta, eps=1e-5):
    """BatchNorm2d in training mode: batch statistics, biased variance."""
    mean, var = x.mean((0, 2, 3), keepdims=True), x.var((0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma[None, :, None, None] + beta[None, :, None, None]


# ---------------------------------------------------------------- the formulas


def ref_ce(d, hp, case, state):
    return {"ce": ce(d["s_logits"], d["y"])}


def ref_vanilla_kd(d, hp, case, state):
    T, a = hp["temperature"], hp["alpha"]
    return {"kd": a * T * T * kl_rows(softmax(d["t_logits"] / T), softmax(d["s_logits"] / T)), "ce": (1 - a) * ce(d["s_logits"], d["y"])}


def ref_hard_label(d, hp, case, state):
    b = hp["beta"]
    return {"hard": b * ce(d["s_logits"], d["t_logits"].argmax(1)), "ce": (1 - b) * ce(d["s_logits"], d["y"])}


def ref_logit_l2(d, hp, case, state):
    return {"ce": ce(d["s_logits"], d["y"]), "l2": hp["weight"] * mse(d["s_logits"], d["t_logits"])}


def ref_focal_kd(d, hp, case, state):
    T, g = hp["temperature"], hp["gamma"]
    ps, pt = softmax(d["s_logits"] / T), softmax(d["t_logits"] / T)
    fkd = np.mean(np.sum((1 - ps) ** g * pt * np.log(pt / ps), 1))
    return {"ce": ce(d["s_logits"], d["y"]), "fkd": hp["weight"] * T * T * float(fkd)}


def ref_dkd(d, hp, case, state):
    """Zhao et al. eq. 1-4: TCKD on the binary (target, rest) split, NCKD on the renormalised non-targets."""
    T, y = hp["temperature"], d["y"]
    ps, pt = softmax(d["s_logits"] / T), softmax(d["t_logits"] / T)
    tckd = nckd = 0.0
    for i, g in enumerate(y):
        bs, bt = np.array([ps[i, g], 1 - ps[i, g]]), np.array([pt[i, g], 1 - pt[i, g]])
        tckd += float(np.sum(bt * np.log(bt / bs)))
        qs, qt = np.delete(ps[i], g) / (1 - ps[i, g]), np.delete(pt[i], g) / (1 - pt[i, g])
        nckd += float(np.sum(qt * np.log(qt / qs)))
    warm = min((case["epoch"] + 1) / math.ceil(case["epochs"] * 20 / 240), 1.0)  # the official code's ramp, 1-based epochs
    n = len(y)
    return {"ce": ce(d["s_logits"], y), "tckd": warm * hp["alpha"] * T * T * tckd / n, "nckd": warm * hp["beta"] * T * T * nckd / n}


def ref_dist(d, hp, case, state):
    """Huang et al.: 1 - Pearson of the softened predictions, per sample (inter) and per class (intra)."""
    T = hp["temperature"]
    ps, pt = softmax(d["s_logits"] / T), softmax(d["t_logits"] / T)
    inter = np.mean([1 - np.corrcoef(ps[i], pt[i])[0, 1] for i in range(len(ps))])
    intra = np.mean([1 - np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(ps.shape[1])])
    return {"ce": ce(d["s_logits"], d["y"]), "inter": hp["beta"] * T * T * inter, "intra": hp["gamma"] * T * T * intra}


def ref_cosine(d, hp, case, state):
    es, et = flat(d["s_embedding"]), flat(d["t_embedding"])
    n = min(es.shape[1], et.shape[1])
    es, et = adaptive_avg(es, n, 1), adaptive_avg(et, n, 1)
    cos = np.sum(unit(es) * unit(et), 1)
    return {"ce": ce(d["s_logits"], d["y"]), "cos": hp["weight"] * float(np.mean(1 - cos))}


def ref_sp(d, hp, case, state):
    """Tung & Mori eq. 2-4: row-normalised batch Gram matrices, squared Frobenius gap / b^2."""
    fs, ft = flat(d["s_feature"]), flat(d["t_feature"])
    gs, gt = unit(fs @ fs.T), unit(ft @ ft.T)
    return {"ce": ce(d["s_logits"], d["y"]), "sp": hp["gamma"] * float(np.sum((gt - gs) ** 2)) / len(fs) ** 2}


def ref_feature_mse(d, hp, case, state):
    """Seed 003 method 3: 1x1 conv + BN + ReLU, both maps channel-L2-normalised, MSE, linear ramp over half the epochs."""
    p = state["params"]
    x = np.maximum(batch_norm_train(conv2d(d["s_feature"], p["proj.0.weight"]), p["proj.1.weight"], p["proj.1.bias"]), 0)
    hw = smaller_hw(x, d["t_feature"])

    def norm(f):
        return f / np.maximum(np.sqrt((f**2).sum(1, keepdims=True)), 1e-6)

    ramp = min(1.0, (case["epoch"] + 1) / max(1, case["epochs"] // 2))
    return {"ce": ce(d["s_logits"], d["y"]),
            "feat": hp["weight"] * ramp * mse(norm(pool2(x, hw)), norm(pool2(d["t_feature"], hw)))}


def _at(f):
    """Zagoruyko & Komodakis: Q = sum_c |A_c|^p (here the channel mean, p = 2), vectorised, / ||Q||_2."""
    return unit(flat((np.abs(f) ** 2).mean(1)))


def ref_attention(d, hp, case, state):
    """Paper form: the larger feature map average-pooled to the smaller size, then the attention maps."""
    hw = smaller_hw(d["s_feature"], d["t_feature"])
    return {"ce": ce(d["s_logits"], d["y"]),
            "at": hp["beta"] * mse(_at(pool2(d["s_feature"], hw)), _at(pool2(d["t_feature"], hw)))}


def ref_attention_seed003(d, hp, case, state):
    """Seed 003: the squared map (channel mean of F^2) pooled to the smaller size, then normalised."""
    hw = smaller_hw(d["s_feature"], d["t_feature"])

    def att(f):
        return unit(flat(pool2((f**2).mean(1, keepdims=True), hw)))

    return {"ce": ce(d["s_logits"], d["y"]), "at": hp["beta"] * mse(att(d["s_feature"]), att(d["t_feature"]))}


def ref_fitnet(d, hp, case, state):
    """Romero et al.: a regressor (conv + BN + ReLU reaching the teacher's size) then MSE to the teacher's map."""
    p = state["params"]
    kind, _, stride, pad = _fitnet_conv(case["s_feature"], case["t_feature"])
    conv = conv2d if kind == "conv" else conv_transpose2d
    r = conv(d["s_feature"], p["regressor.0.weight"], stride, pad)
    r = np.maximum(batch_norm_train(r, p["regressor.1.weight"], p["regressor.1.bias"]), 0)
    assert r.shape == d["t_feature"].shape, (r.shape, d["t_feature"].shape)
    return {"ce": ce(d["s_logits"], d["y"]), "hint": hp["weight"] * mse(r, d["t_feature"])}


def ref_fitnet_seed003(d, hp, case, state):
    """Seeds 000/001: a 3x3 conv with bias (padding 1), both maps pooled to the smaller size, MSE."""
    p = state["params"]
    r = conv2d(d["s_feature"], p["regressor.weight"], 1, 1, p["regressor.bias"])
    hw = smaller_hw(r, d["t_feature"])
    return {"ce": ce(d["s_logits"], d["y"]), "hint": hp["weight"] * mse(pool2(r, hw), pool2(d["t_feature"], hw))}


def _rkd_terms(zs, zt):
    """Park et al. eq. 4-7: distances / their mean over distinct pairs; cosines of the angle at every anchor."""
    n = len(zs)

    def dist(z):
        dd = np.linalg.norm(z[:, None, :] - z[None, :, :], axis=2)
        return dd / (dd.sum() / (n * (n - 1)))

    def angles(z):
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i not in (j, k):
                        u, v = z[j] - z[i], z[k] - z[i]
                        a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    return huber(dist(zs), dist(zt)), huber(angles(zs), angles(zt))


def ref_rkd(d, hp, case, state):
    dist, angle = _rkd_terms(flat(d["s_embedding"]), flat(d["t_embedding"]))
    return {"ce": ce(d["s_logits"], d["y"]), "dist": hp["w_dist"] * dist, "angle": hp["w_angle"] * angle}


def ref_rkd_seed003(d, hp, case, state):
    dist, angle = _rkd_terms(unit(flat(d["s_embedding"])), unit(flat(d["t_embedding"])))
    return {"ce": ce(d["s_logits"], d["y"]), "dist": hp["w_dist"] * dist, "angle": hp["w_angle"] * angle}


def ref_pkt(d, hp, case, state):
    """Passalis & Tefas: K = (cos + 1) / 2, P = K row-normalised (self-pairs kept), KL averaged over all N^2 entries
    (with the authors' eps = 1e-7 in the norm and the log)."""
    eps = 1e-7

    def probs(e):
        z = flat(e)
        z = z / (np.linalg.norm(z, axis=1, keepdims=True) + eps)
        k = (z @ z.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = probs(d["s_embedding"]), probs(d["t_embedding"])
    return {"ce": ce(d["s_logits"], d["y"]), "pkt": hp["weight"] * float(np.mean(pt * np.log((pt + eps) / (ps + eps))))}


def ref_pkt_seed003(d, hp, case, state):
    """Seed 003: softmax over the other samples of cos / sigma, KL summed per anchor, mean over anchors."""
    zs, zt = unit(flat(d["s_embedding"])), unit(flat(d["t_embedding"]))
    n, total = len(zs), 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        ps = softmax((zs[others] @ zs[i])[None] / hp["sigma"])[0]
        pt = softmax((zt[others] @ zt[i])[None] / hp["sigma"])[0]
        total += float(np.sum(pt * np.log(pt / ps)))
    return {"ce": ce(d["s_logits"], d["y"]), "pkt": hp["weight"] * total / n}


def _embed(e, w, b):
    return unit(flat(e) @ w.T + b)


def ref_crd_seed003(d, hp, case, state):
    p = state["params"]
    zs, zt = _embed(d["s_embedding"], p["proj_s.weight"], p["proj_s.bias"]), _embed(d["t_embedding"], p["proj_t.weight"], p["proj_t.bias"])
    return {"ce": ce(d["s_logits"], d["y"]), "nce": hp["weight"] * ce(zs @ zt.T / hp["tau"], np.arange(len(zs)))}


def ref_crd(d, hp, case, state):
    """Tian et al. with the reference constants: scores exp(v . m / 0.07) / Z against the other side's bank (column 0:
    the sample's own row), Z = mean score * N fixed on the first batch, NCE with uniform noise P_n = 1/N summed over
    both directions; then each bank's rows of the batch move to the new embeddings (momentum 0.5) and are renormalised."""
    p, n, T, m = state["params"], state["n"], 0.07, 0.5
    vs, vt = _embed(d["s_embedding"], p["proj_s.weight"], p["proj_s.bias"]), _embed(d["t_embedding"], p["proj_t.weight"], p["proj_t.bias"])
    cols = d["cols"]
    k_pn = (cols.shape[1] - 1) / n

    def nce(v, bank, z_key):
        e = np.exp(np.einsum("bkd,bd->bk", bank[cols], v) / T)
        state.setdefault(z_key, e.mean() * n)
        x = e / state[z_key]
        return -(np.sum(np.log(x[:, 0] / (x[:, 0] + k_pn + 1e-7))) + np.sum(np.log(k_pn / (x[:, 1:] + k_pn + 1e-7)))) / len(v)

    loss = nce(vs, state["memory_t"], "z_s") + nce(vt, state["memory_s"], "z_t")
    for key, v in (("memory_s", vs), ("memory_t", vt)):
        state[key] = state[key].copy()
        state[key][d["ids"]] = unit(state[key][d["ids"]] * m + v * (1 - m))
    return {"ce": ce(d["s_logits"], d["y"]), "nce": hp["weight"] * loss}


REFERENCES = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_")}


def expected(case: dict) -> list[dict[str, float]]:
    steps = case_inputs(case)
    state = {k: v for k, v in steps[0].items() if k in ("params", "memory_s", "memory_t")} | {"n": CRD_N}
    return [REFERENCES[case["method"]](d, case["hp"], case, state) for d in steps]


def main() -> None:
    out = []
    for case in cases():
        out.append({**case, "checksum": checksum(case_inputs(case)), "expected": expected(case)})
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(out)} cases of {len({c['method'] for c in out})} methods to {FIXTURE}")


if __name__ == "__main__":
    main()
