#!/usr/bin/env python3
"""Regenerates the reference numbers of invdiff's schedule / inverse-problem tests.

Run with the project's torch venv (torch 2.15, diffusers 0.42.1, numpy, scipy):

    /work/venvs/torch/bin/python scripts/sched_reference.py

It writes tests/data/sched/{schedule,rng,inverse}.json. Floats are stored as the hex bits of their
f32 (or as decimal f64 where the Rust side computes in f64), so the tests can compare bits.

Schedulers: every coefficient is computed twice with a numpy-f32 transcription of diffusers'
code, once with torch's CPU sqrt (asserted to reproduce `DDPMScheduler.step` /
`DDIMScheduler.step` bit for bit, which validates the operation order) and once with the
correctly rounded sqrt that the Rust code uses (stored: the Rust test compares bits). The
script also asserts the two differ by at most MAX_ULP, the tolerance the Rust tests give
torch's own values.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.fft as fft
from diffusers import DDIMScheduler, DDPMScheduler

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sched"
F = np.float32
# Largest |exact - torch| in ulp per field, asserted here and used by the Rust tests on torch's
# values: 1 where one torch sqrt is involved, more where a 1-ulp sqrt is multiplied or squared,
# and much more for DDIM's sqrt(1 - a_prev - std**2), where the subtraction cancels.
MAX_ULP = dict(sqrt_alpha_prod=1, sqrt_one_minus_alpha_prod=1, c_x0=3, c_xt=2, c_eps=128,
               noise_std=2, dps_eta=2, pigdm_r=1, pigdm_r2=3, pigdm_sqrt_alpha=1)

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv_bytes(data: bytes, h: int = FNV_OFFSET) -> int:
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def bits(x) -> int:
    return int(np.frombuffer(np.float32(x).tobytes(), np.uint32)[0])


def ulp_diff(a, b) -> int:
    ia = np.frombuffer(np.float32(a).tobytes(), np.int32)[0]
    ib = np.frombuffer(np.float32(b).tobytes(), np.int32)[0]
    return abs(int(ia) - int(ib))


def hex32(x) -> str:
    return f"{bits(x):08x}"


def sqrt_exact(x):
    return F(np.sqrt(F(x)))


def sqrt_torch(x):
    return F(torch.tensor(F(x), dtype=torch.float32).sqrt().item())


# ---------------------------------------------------------------------------------------------
# Schedulers

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}

# Order of the hashed StepCoeffs / GuidanceCoeffs fields (the Rust test hashes the same list).
STEP_FIELDS = [
    "alpha_prod_t", "alpha_prod_t_prev", "sqrt_alpha_prod", "sqrt_one_minus_alpha_prod",
    "c_x0", "c_xt", "c_eps", "variance", "noise_std",
]
GUIDE_FIELDS = [
    "alpha_t", "beta_t", "dps_eta", "pigdm_variance", "pigdm_r", "pigdm_r2", "pigdm_alpha",
    "pigdm_sqrt_alpha",
]


def guidance(a_t, a_p, var, sq):
    alpha = F(a_t / a_p)
    beta = F(F(1) - alpha)
    r = sq(F(var / F(var + F(1))))
    pa = F(F(1) / F(var + F(1)))
    return dict(alpha_t=alpha, beta_t=beta, dps_eta=F(beta / sq(alpha)), pigdm_variance=var,
                pigdm_r=r, pigdm_r2=F(r * r), pigdm_alpha=pa, pigdm_sqrt_alpha=sq(pa))


def ddpm_coeffs(s, t, sq):
    acp = s.alphas_cumprod.numpy()
    prev = int(s.previous_timestep(t))
    a_t = acp[t]
    a_p = acp[prev] if prev >= 0 else F(1)
    b_t, b_p = F(F(1) - a_t), F(F(1) - a_p)
    cur_a = F(a_t / a_p)
    cur_b = F(F(1) - cur_a)
    var = F(F(F(1) - a_p) / F(F(1) - a_t)) * cur_b
    var = max(F(var), F(1e-20))
    if s.config.variance_type == "fixed_large":
        var = cur_b
    c = dict(
        t=t, prev_t=prev, alpha_prod_t=a_t, alpha_prod_t_prev=a_p, sqrt_alpha_prod=sq(a_t),
        sqrt_one_minus_alpha_prod=sq(b_t), c_x0=F(F(sq(a_p) * cur_b) / b_t),
        c_xt=F(F(sq(cur_a) * b_p) / b_t), c_eps=F(0), variance=F(var),
        noise_std=sq(var) if t > 0 else F(0), uses_noise=t > 0,
    )
    c.update(guidance(a_t, a_p, F(var), sq))
    return c


def ddim_coeffs(s, t, eta, sq):
    acp = s.alphas_cumprod.numpy()
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = acp[t]
    a_p = acp[prev] if prev >= 0 else F(s.final_alpha_cumprod.item())
    b_t = F(F(1) - a_t)
    var = F(F(F(1) - a_p) / b_t) * F(F(1) - F(a_t / a_p))
    var = F(var)
    std = F(F(eta) * sq(var))
    c = dict(
        t=t, prev_t=prev, alpha_prod_t=a_t, alpha_prod_t_prev=a_p, sqrt_alpha_prod=sq(a_t),
        sqrt_one_minus_alpha_prod=sq(b_t), c_x0=sq(a_p), c_xt=F(0),
        c_eps=sq(F(F(F(1) - a_p) - F(std * std))), variance=var, noise_std=std,
        uses_noise=eta > 0,
    )
    c.update(guidance(a_t, a_p, var, sq))
    return c


def np_step(c, eps, x, z, clip):
    """The elementwise formula of invdiff's StepCoeffs, in numpy f32."""
    x0 = (x - c["sqrt_one_minus_alpha_prod"] * eps) / c["sqrt_alpha_prod"]
    if clip is not None:
        x0 = np.clip(x0, F(-clip), F(clip))
    p = c["c_x0"] * x0
    if c["c_xt"] != 0:
        p = p + c["c_xt"] * x
    if c["c_eps"] != 0:
        p = p + c["c_eps"] * eps
    if c["uses_noise"]:
        p = p + c["noise_std"] * z
    return x0.astype(F), p.astype(F)


def hash_steps(coeffs):
    h = FNV_OFFSET
    for c in coeffs:
        h = fnv_bytes(np.array([c["t"], c["prev_t"]], "<i8").tobytes(), h)
        vals = [c[k] for k in STEP_FIELDS + GUIDE_FIELDS]
        h = fnv_bytes(np.array([bits(v) for v in vals] + [int(c["uses_noise"])], "<u4").tobytes(), h)
    return f"{h:016x}"


def hash_i64(vals):
    return f"{fnv_bytes(np.array(vals, '<i8').tobytes()):016x}"


def hash_f32(vals):
    return f"{fnv_bytes(np.asarray(vals, '<f4').tobytes()):016x}"


def make_scheduler(kind, sched, spacing, offset=0, variance_type="fixed_small", alpha_one=True):
    kw = dict(SCHEDULES[sched], timestep_spacing=spacing, steps_offset=offset)
    if kind == "ddpm":
        return DDPMScheduler(**kw, variance_type=variance_type)
    return DDIMScheduler(**kw, set_alpha_to_one=alpha_one)


def check_step_vs_diffusers(kind, s, c_torch, t, eta, rng):
    """Asserts that the transcription with torch's sqrt reproduces diffusers' step exactly."""
    shape = (1, 1, 2, 8)
    x = torch.from_numpy(rng.standard_normal(shape).astype(F) * F(1.5))
    eps = torch.from_numpy(rng.standard_normal(shape).astype(F))
    seed = int(rng.integers(1 << 31))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "ddpm":
        out = s.step(eps, t, x, generator=torch.Generator().manual_seed(seed))
    else:
        out = s.step(eps, t, x, eta=eta, variance_noise=z if eta > 0 else None)
    clip = s.config.clip_sample_range if s.config.clip_sample else None
    x0, prev = np_step(c_torch, eps.numpy(), x.numpy(), z.numpy(), clip)
    assert np.array_equal(x0, out.pred_original_sample.numpy()), (kind, t, "x0")
    assert np.array_equal(prev, out.prev_sample.numpy()), (kind, t, "prev")
    return x, eps, z, out


def pick_steps(n):
    idx = sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))
    return idx


def schedule_cases():
    rng = np.random.default_rng(1234)
    tables = {}
    for name in SCHEDULES:
        s = DDPMScheduler(**SCHEDULES[name])
        betas, alphas, acp = s.betas.numpy(), s.alphas.numpy(), s.alphas_cumprod.numpy()
        # The construction facts the Rust code relies on.
        assert np.array_equal(acp, np.cumprod(alphas.astype(np.float64)).astype(F))
        assert np.array_equal(alphas, F(1) - betas)
        tables[name] = dict(
            betas=hash_f32(betas), alphas=hash_f32(alphas), alphas_cumprod=hash_f32(acp),
            anchors=[[i, hex32(betas[i]), hex32(acp[i])] for i in (0, 1, 99, 499, 500, 990, 999)],
        )
    trained = [0.0001 + 0.0123 * i / 19 for i in range(20)]
    s = DDPMScheduler(num_train_timesteps=20, trained_betas=trained)
    tables["trained"] = dict(values=trained, betas=hash_f32(s.betas.numpy()),
                             alphas_cumprod=hash_f32(s.alphas_cumprod.numpy()))

    # Every N for each spacing, in one hash per spacing (N whose timesteps leave 0..T are errors).
    all_n = {}
    for spacing in ("leading", "linspace", "trailing"):
        s = DDPMScheduler(timestep_spacing=spacing)
        h = FNV_OFFSET
        errors = []
        for n in range(1, 1001):
            s.set_timesteps(n)
            ts = s.timesteps.numpy()
            if ts.min() < 0 or ts.max() >= 1000:
                errors.append(n)
                continue
            h = fnv_bytes(np.array([n], "<i8").tobytes(), h)
            h = fnv_bytes(ts.astype("<i8").tobytes(), h)
        all_n[spacing] = dict(hash=f"{h:016x}", errors=errors)

    cases = []
    detailed = []
    worst = {}

    def add(kind, sched, spacing, n, eta=0.0, offset=0, variance_type="fixed_small", alpha_one=True,
            details=False):
        s = make_scheduler(kind, sched, spacing, offset, variance_type, alpha_one)
        s.set_timesteps(n)
        ts = [int(t) for t in s.timesteps]
        exact, torchc = [], []
        for i, t in enumerate(ts):
            if kind == "ddpm":
                ce, ct = ddpm_coeffs(s, t, sqrt_exact), ddpm_coeffs(s, t, sqrt_torch)
                # ΠGDM's variance is diffusers' _get_variance, whatever the notebook passes.
                assert F(s._get_variance(t, t - 10).item()) == ce["pigdm_variance"]
            else:
                ce, ct = ddim_coeffs(s, t, eta, sqrt_exact), ddim_coeffs(s, t, eta, sqrt_torch)
                assert F(s._get_variance(t, ce["prev_t"]).item()) == ce["variance"]
            if i in pick_steps(len(ts)) or n <= 7:
                check_step_vs_diffusers(kind, s, ct, t, eta, rng)
            for k in STEP_FIELDS + GUIDE_FIELDS:
                d = ulp_diff(ce[k], ct[k])
                worst[k] = max(worst.get(k, 0), d)
                assert d <= MAX_ULP.get(k, 0), (kind, sched, spacing, n, t, k, ce[k], ct[k])
            exact.append(ce)
            torchc.append(ct)
        # Compact rows: hex values in STEP_FIELDS + GUIDE_FIELDS order.
        for i in sorted({0, len(ts) // 2, len(ts) - 1}) if details else []:
            ce, ct = exact[i], torchc[i]
            fields = STEP_FIELDS + GUIDE_FIELDS
            detailed.append([len(cases), ce["t"], ce["prev_t"], bool(ce["uses_noise"]),
                             [hex32(ce[k]) for k in fields], [hex32(ct[k]) for k in fields]])
        cases.append([kind, sched, spacing, n, eta, offset, variance_type, alpha_one,
                      hash_i64(ts), hash_steps(exact)])

    for sched in SCHEDULES:
        for spacing in ("leading", "linspace", "trailing"):
            for n in (7, 50, 100, 1000):
                # Per-step values for the notebook's setting and one case of each schedule.
                d = spacing == "leading" and (n == 100 or (sched != "linear" and n == 7))
                add("ddpm", sched, spacing, n, details=d)
                for eta in (0.0, 0.5, 1.0):
                    add("ddim", sched, spacing, n, eta=eta, details=d and eta == 1.0)
    add("ddpm", "linear", "leading", 100, variance_type="fixed_large")
    add("ddpm", "linear", "leading", 50, offset=1)
    add("ddim", "linear", "leading", 50, eta=0.3, offset=1)
    add("ddim", "linear", "leading", 20, eta=0.7, alpha_one=False)
    print("max ulp exact-vs-torch per field:", worst)

    # Elementwise fixture: diffusers step outputs with torch's coefficients (as hex), for the
    # Rust test that feeds those coefficients through step_slice.
    elementwise = []
    for kind, n, t, eta in (("ddpm", 100, 990, 0.0), ("ddpm", 100, 500, 0.0), ("ddpm", 100, 0, 0.0),
                            ("ddim", 50, 980, 0.0), ("ddim", 50, 20, 1.0), ("ddim", 50, 0, 0.5)):
        s = make_scheduler(kind, "linear", "leading")
        s.set_timesteps(n)
        ct = ddpm_coeffs(s, t, sqrt_torch) if kind == "ddpm" else ddim_coeffs(s, t, eta, sqrt_torch)
        x, eps, z, out = check_step_vs_diffusers(kind, s, ct, t, eta, rng)
        elementwise.append(dict(
            kind=kind, n=n, t=t, eta=eta,
            coeffs={k: hex32(ct[k]) for k in STEP_FIELDS},
            x=[hex32(v) for v in x.flatten().tolist()],
            eps=[hex32(v) for v in eps.flatten().tolist()],
            z=[hex32(v) for v in z.flatten().tolist()],
            x0=[hex32(v) for v in out.pred_original_sample.flatten().tolist()],
            prev=[hex32(v) for v in out.prev_sample.flatten().tolist()],
        ))
    return dict(max_ulp=MAX_ULP, fields=STEP_FIELDS + GUIDE_FIELDS, tables=tables, all_n=all_n,
                cases=cases, details=detailed, elementwise=elementwise)


# ---------------------------------------------------------------------------------------------
# rng: an independent transcription of the recipe in src/rng.rs's module doc.

def philox4x32_10(ctr, key):
    c, k = list(ctr), list(key)
    for rnd in range(10):
        if rnd:
            k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
    return c


def f32_from_bits(b):
    return np.frombuffer(np.uint32(b).tobytes(), np.float32)[0]


def rng_ln(x):
    ix = (bits(x) + (0x3F800000 - 0x3F3504F3)) & 0xFFFFFFFF
    k = (ix >> 23) - 0x7F
    m = f32_from_bits((ix & 0x007FFFFF) + 0x3F3504F3)
    f = F(m - F(1))
    s_ = F(f / F(F(2) + f))
    z = F(s_ * s_)
    w = F(z * z)
    lg1, lg2, lg3, lg4 = (f32_from_bits(b) for b in (0x3F2AAAAA, 0x3ECCCE13, 0x3E91E9EE, 0x3E789E26))
    t1 = F(w * F(lg2 + F(w * lg4)))
    t2 = F(z * F(lg1 + F(w * lg3)))
    r = F(t2 + t1)
    hfsq = F(F(F(0.5) * f) * f)
    dk = F(k)
    out = F(s_ * F(hfsq + r))
    out = F(out + F(dk * f32_from_bits(0x3717F7D1)))
    out = F(out - hfsq)
    out = F(out + f)
    return F(out + F(dk * f32_from_bits(0x3F317180)))


def rng_sincos(u):
    s1, s2, s3, c1, c2, c3 = (f32_from_bits(b) for b in (
        0xBE2AAAA3, 0x3C08839E, 0xB94CA1F9, 0x3D2AAAA5, 0xBAB6061A, 0x37CCF5CE))
    q = F(np.rint(F(u * F(4))))
    x = F(F(u - F(q * F(0.25))) * f32_from_bits(0x40C90FDB))
    z = F(x * x)
    sn = F(F(F(F(F(F(F(s3 * z) + s2) * z) + s1) * z) * x) + x)
    cs = F(F(F(F(F(F(F(F(c3 * z) + c2) * z) + c1) * z) * z) - F(F(0.5) * z)) + F(1))
    return {0: (sn, cs), 1: (cs, -sn), 2: (-sn, -cs), 3: (-cs, sn)}[int(q) & 3]


def rng_normal(seed, stream, index):
    pair = index >> 1
    m = 0xFFFFFFFF
    r = philox4x32_10([pair & m, pair >> 32, stream & m, stream >> 32], [seed & m, seed >> 32])
    u1 = F(F(F(r[0] >> 9) + F(0.5)) * F(2.0 ** -23))
    u2 = F(F(F(r[1] >> 9) + F(0.5)) * F(2.0 ** -23))
    radius = F(np.sqrt(F(F(-2) * rng_ln(u1))))
    sn, cs = rng_sincos(u2)
    return F(radius * (cs if index % 2 == 0 else sn))


def rng_cases():
    out = []
    for seed, stream, first, count in ((0, 0, 0, 8), (42, 7, 0, 8), (2**64 - 1, 2**63 + 5, 2**40, 4),
                                        (1234, 0, 196606, 4)):
        out.append([str(seed), str(stream), str(first),
                    [hex32(rng_normal(seed, stream, first + i)) for i in range(count)]])
    # Also a sweep, hashed: stream 3, seed 9, elements 0..20000.
    vals = np.array([rng_normal(9, 3, i) for i in range(20000)], F)
    return dict(values=out, sweep_seed=9, sweep_stream=3, sweep=hash_f32(vals))


# ---------------------------------------------------------------------------------------------
# inverse: the notebook's FFT helpers (utils_agem.py / TP-DM, verbatim) and KAIR's metrics.

def p2o(psf, shape):
    otf = torch.zeros(psf.shape[:-2] + shape).type_as(psf)
    otf[..., : psf.shape[2], : psf.shape[3]].copy_(psf)
    for axis, axis_size in enumerate(psf.shape[2:]):
        otf = torch.roll(otf, -int(axis_size / 2), dims=axis + 2)
    return otf


def fft_blur(img, k):
    k = p2o(k, img.shape[-2:])
    return fft.ifft2(fft.fft2(k).mul(fft.fft2(img))).real


def pinv_deblurring(x, k, r=1, sigma=1e-8):  # the notebook's own version
    k = p2o(k, x.shape[-2:])
    Fk = fft.fft2(k)
    FkC = Fk.conj()
    Fk2 = Fk.mul(FkC)
    num = FkC
    den = r ** 2 * Fk2 + sigma ** 2
    res = (num / den) * fft.fft2(x)
    return fft.ifft2(res).real


def deblurring_guidance(y, x, k, sigma=0, r=1):
    if sigma == 0:
        sigma += 1e-8
    return pinv_deblurring(y, k, r=r, sigma=sigma) - pinv_deblurring(fft_blur(x, k), k, r=r, sigma=sigma)


def tensor2uint(img):
    img = img.data.squeeze().float().clamp_(0, 1).cpu().numpy()
    if img.ndim == 3:
        img = np.transpose(img, (1, 2, 0))
    return np.uint8((img * 255.0).round())


def calculate_psnr(img1, img2):
    img1 = img1.astype(np.float64)
    img2 = img2.astype(np.float64)
    mse = np.mean((img1 - img2) ** 2)
    return float("inf") if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def kair_ssim(img1, img2):
    from scipy.signal import correlate2d
    C1 = (0.01 * 255) ** 2
    C2 = (0.03 * 255) ** 2
    img1 = img1.astype(np.float64)
    img2 = img2.astype(np.float64)
    # cv2.getGaussianKernel(11, 1.5)
    x = np.arange(11) - 5.0
    g = np.exp(-0.5 / (1.5 * 1.5) * x * x)
    g = g * (1.0 / g.sum())
    window = np.outer(g, g)
    f = lambda im: correlate2d(im, window, mode="valid")  # == cv2.filter2D(...)[5:-5, 5:-5]
    mu1, mu2 = f(img1), f(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    sigma1_sq = f(img1 ** 2) - mu1_sq
    sigma2_sq = f(img2 ** 2) - mu2_sq
    sigma12 = f(img1 * img2) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + C1) * (2 * sigma12 + C2)) / ((mu1_sq + mu2_sq + C1) * (sigma1_sq + sigma2_sq + C2))
    return ssim_map.mean()


def calculate_ssim(img1, img2):
    if img1.ndim == 2:
        return kair_ssim(img1, img2)
    return np.array([kair_ssim(img1[:, :, i], img2[:, :, i]) for i in range(img1.shape[2])]).mean()


def test_image(c, h, w, salt):
    """Integer-valued 8-bit test image; tests/inverse_metrics.rs computes the same formula."""
    img = np.zeros((c, h, w), np.uint8)
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                v = (x * 7 + y * 13 + ch * 50 + ((x * y) % 17) * 3) % 256
                noise = ((ch * 1000003 + y * 7919 + x * 104729 + salt * 15485863) * 2654435761 >> 7) % 41
                img[ch, y, x] = min(255, max(0, v + (noise - 20) * (salt != 0)))
    return img


def inverse_cases():
    rng = np.random.default_rng(99)
    blur = []
    r = torch.tensor(0.391191423, dtype=torch.float32)
    sigma = 10 / 255
    for kh, kw in ((5, 3), (4, 6), (1, 1)):
        x = torch.from_numpy(rng.random((1, 3, 8, 6)).astype(F))
        y = torch.from_numpy(rng.random((1, 3, 8, 6)).astype(F))
        k = torch.from_numpy(rng.random((1, 1, kh, kw)).astype(F))
        fwd = fft_blur(x, k)
        xg = x.clone().requires_grad_()
        (adj,) = torch.autograd.grad(fft_blur(xg, k), xg, grad_outputs=y)
        pinv = pinv_deblurring(y, k, r=r, sigma=sigma)
        guide = deblurring_guidance(y, x, k, sigma=sigma, r=r)
        guide0 = deblurring_guidance(y, x, k, sigma=0, r=torch.tensor(0.5))
        enc = lambda t: [hex32(v) for v in t.flatten().tolist()]
        dec = enc
        blur.append(dict(kernel_shape=[kh, kw], x=enc(x), y=enc(y), k=enc(k), r=hex32(r.item()),
                         sigma=hex32(sigma), forward=dec(fwd), adjoint=dec(adj), pinv=dec(pinv),
                         guidance=dec(guide), guidance_sigma0_r05=dec(guide0)))
    metrics = []
    for c, h, w in ((3, 24, 20), (1, 16, 16)):
        a8, b8 = test_image(c, h, w, 0), test_image(c, h, w, 1)
        a = torch.from_numpy(a8).float().div(255.0)[None]
        b = torch.from_numpy(b8).float().div(255.0)[None]
        ua, ub = tensor2uint(a), tensor2uint(b)
        assert np.array_equal(ua, a8.transpose(1, 2, 0).squeeze())
        metrics.append(dict(shape=[1, c, h, w], psnr=calculate_psnr(ua, ub),
                            ssim=float(calculate_ssim(ua, ub))))
    # tensor2uint on values whose x*255 is exactly a half (ties to even) and out-of-range ones.
    ties = [float(F((k + 0.5) / 255)) for k in range(255) if F(F((k + 0.5) / 255) * F(255)) == k + 0.5]
    vals = np.array(ties[:12] + [-0.25, 0.0, 1e-9, 0.5, 0.999, 1.0, 1.5, 0.0019607844], F)
    u8 = tensor2uint(torch.from_numpy(vals)[None, None])
    return dict(blur=blur, metrics=metrics, to_u8=[[hex32(v) for v in vals], u8.flatten().tolist()])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("schedule", schedule_cases), ("rng", rng_cases), ("inverse", inverse_cases)):
        path = OUT / f"{name}.json"
        with open(path, "w") as f:
            json.dump(make(), f, separators=(",", ":"))
        print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
