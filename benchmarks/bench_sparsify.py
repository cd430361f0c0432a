"""Dictionary quality per token: `traitscope train` with its own defaults against EleutherAI's sparsify and
overcomplete, trained in this script on the same tokens, in the same order, scored on the same held-out images.

    pip install eai-sparsify==1.3.3 overcomplete==0.3.0   # the peers, from PyPI by name (not traitscope dependencies)
    python benchmarks/bench_sparsify.py [--data camvid,fish,DIR] [--tokens 512k] [--ablate [NAMES]] [--batch-size 2048]
                                        [--d-sae N] [--k 32] [--model M] [--layer -2] [--resolution PX]
                                        [--peers sparsify,overcomplete]

Data: real photos beside the project (../shared/data): `camvid_train/images` (367 street scenes) and
`fishvista_demo` (110 museum fish photos), or any folder of images (--data DIR), each run through a
backbone with `traitscope shards`: by default the offline DINOv2 ViT-S/14 (`dinov2-vits14-saliency-offline`,
layer -2, 256 patch tokens of 384 dims per image; `--model efficientnet-lite0` is the offline CNN).
A shard folder (traitscope's, or saev's) given as --data DIR is used as it is. 10% of the images are
held out (traitscope's own split, seed 0).

Every SAE: --d-sae latents (default: `traitscope train`'s, 16 per dimension: 6144 for DINOv2-S), --k (32),
batches of --batch-size tokens (default: `traitscope train`'s) from traitscope's shuffled loader (seed 0),
so all see the same batches in the same order.
- sparsify: a TopK `SparseCoder` with the recipe of sparsify's own `Trainer` at its defaults (signum: sign
  SGD in a schedule-free wrapper, momentum 0.95, lr 5e-3 / sqrt(latents / 2^14), no schedule; decoder
  bias set to the first batch's mean; unit-norm decoder rows, the gradient along them removed; loss
  FVU; AuxK off (`auxk_alpha` 0); raw activations). Scored with the schedule-free averaged weights.
- overcomplete (Fel et al.'s vision SAE library): its `TopKSAE` trained by its own `train_sae`, with the
  recipe of its README (Adam at 5e-4, mean squared error, gradients clipped at norm 1, no schedule; its
  default linear encoder and unit-norm dictionary, no decoder bias; raw activations).
- traitscope: `traitscope.train.train` with default `RunSettings` (a Matryoshka SAE) but d_sae and k,
  default `TrainConfig` but the budget, batch size and a 10% hold-out.

Printed per data set: its size and how many directions its tokens use (the participation ratio of the
covariance's eigenvalues, and the principal directions holding 90% of the variance).
Printed per SAE: held-out NMSE (squared error over the held-out tokens' total sum of squares around
their mean), L0, and the dead fraction: latents that fire on no training token (one pass over all
of them with the final SAE). An SAE with a learned threshold (Matryoshka, BatchTopK) fires more than k
latents on held-out tokens, so it is scored a second time with the threshold at which the held-out
tokens fire k on average: sparsify's L0. With --ablate, traitscope's settings are varied one at a time
(learning rate, its schedule, AuxK window, weight and leak, decoder-bias start, Adam β2, the TopK
family's other variants; "before": the defaults before issue 12) and sparsify's input scale, to find
where a gap comes from. Shards and runs are cached under --work: a rerun only scores.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from traitscope.errors import TraitscopeError
from traitscope.sae import load_sae
from traitscope.sae.batchtopk import BatchTopKSAE
from traitscope.shards import Shards
from traitscope.train import RunSettings, TrainConfig, train
from traitscope.train.config import parse_count
from traitscope.train.loader import ShuffledLoader, TokenSplit

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO.parent / "shared" / "data").resolve()
SETS = {"camvid": DATA / "camvid_train" / "images", "fish": DATA / "fishvista_demo"}
PEERS = {"sparsify": "eai-sparsify==1.3.3", "overcomplete": "overcomplete==0.3.0"}  # module: pip requirement
MODEL, LAYER, K, VAL_FRAC, SEED = "dinov2-vits14-saliency-offline", -2, 32, 0.1, 0  # defaults of the options

# Settings that differ from traitscope's defaults (--ablate): one change each, or Matryoshka with changes of its own;
# lr_scale multiplies the default learning rate.
# "before" is the recipe before issue 12 (the TopK paper's lr 2e-4 / sqrt(d_sae / 2^14), AuxK weight 1/32
# after 10M tokens without firing: off in these runs; and a plain ReLU on its coefficients).
ABLATIONS = {
    "defaults": {},
    "topk": {"variant": "topk"},  # the default until 3 December 2026
    "before": {"lr_scale": 0.1, "dead_tokens": 10_000_000, "auxk_alpha": 1 / 32, "auxk_leak": 0},
    "lr-div10": {"lr_scale": 0.1},
    "lr-div2": {"lr_scale": 0.5},
    "lr-div4": {"lr_scale": 0.25},
    "no-auxk": {"dead_tokens": 10_000_000},
    "auxk-1/32": {"auxk_alpha": 1 / 32},
    "auxk-64k": {"dead_tokens": 65_536},
    "auxk-16k-1/8": {"dead_tokens": 16_384, "auxk_alpha": 1 / 8},  # AuxK's defaults until 2 December 2026
    "auxk-16k": {"dead_tokens": 16_384},
    "auxk-1/8": {"auxk_alpha": 1 / 8},
    "auxk-1/2": {"auxk_alpha": 1 / 2},
    "kaux-dmodel": {"k_aux": 384},
    "auxk-relu": {"auxk_leak": 0},
    "auxk-leak-0.03": {"auxk_leak": 0.03},
    "auxk-leak-0.3": {"auxk_leak": 0.3},
    "no-decay": {"lr_decay": "none"},
    "median": {"b_dec_init": "median"},
    "beta2-0.99": {"beta2": 0.99},
    "batchtopk": {"variant": "batchtopk"},
    "matryoshka": {"variant": "matryoshka"},
    "matryoshka-lr-x1.5": {"variant": "matryoshka", "lr_scale": 1.5},
    "matryoshka-lr-x2": {"variant": "matryoshka", "lr_scale": 2.0},
    "matryoshka-3-levels": {"variant": "matryoshka", "prefix_levels": 3},
    "matryoshka-4-levels": {"variant": "matryoshka", "prefix_levels": 4},
    "matryoshka-lr-x1.25": {"variant": "matryoshka", "lr_scale": 1.25},
    "matryoshka-4-levels-lr-x1.25": {"variant": "matryoshka", "prefix_levels": 4, "lr_scale": 1.25},
}


class Score(NamedTuple):
    """How one SAE did."""

    nmse: float
    """Held-out squared error over the held-out total sum of squares around the mean."""
    l0: float
    """Mean active latents per held-out token."""
    dead_frac: float
    """Share of latents that fire on no training token."""
    seconds: float
    """Training time."""


def make_shards(images_dpath: Path, work_dpath: Path, model: str, layer: int, resolution: int | None) -> Shards:
    """The model's patch tokens of every image at one layer (content-addressed: made once)."""
    size = ["--resolution", str(resolution)] if resolution else []
    out = subprocess.run([sys.executable, "-m", "traitscope.cli", "shards", "--images", str(images_dpath),
                          "--model", model, "--layers", str(layer), "--tokens", "patches", *size,
                          "--out", str(work_dpath / "shards")], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"traitscope shards failed on {images_dpath}:\n{out.stderr[-2000:]}")
    return Shards(out.stdout.strip().splitlines()[-1])


def training_tokens(split: TokenSplit) -> torch.Tensor:
    """Every training token once (float32), for counting dead latents."""
    with ShuffledLoader(split, split.n_train_tokens, SEED, prefetch=False, stream=7) as loader:
        return next(loader)


def spread(x_nd: torch.Tensor) -> tuple[float, int]:
    """How many directions the tokens use: the participation ratio of the covariance's eigenvalues,
    (Σλ)² / Σλ², and the number of principal directions that hold 90% of the variance."""
    eig = torch.linalg.eigvalsh(torch.cov(x_nd.double().T)).clamp_min(0).flip(0)
    return float(eig.sum() ** 2 / (eig ** 2).sum()), int((eig.cumsum(0) < 0.9 * eig.sum()).sum()) + 1


@torch.inference_mode()
def score(encode_decode, split: TokenSplit, train_nd: torch.Tensor, d_sae: int, seconds: float) -> Score:
    """`encode_decode(x_bd) -> (x_hat_bd, fired latent ids)`, scored on held-out and training tokens."""
    sse = sst = 0.0
    n_active = n_tokens = 0
    val_nd = torch.cat(list(split.val_batches(4096, 10**9)))
    mean_d = val_nd.double().mean(0)
    for x_bd in val_nd.split(4096):
        x_hat_bd, ids = encode_decode(x_bd)
        sse += float(((x_hat_bd.double() - x_bd.double()) ** 2).sum())
        sst += float(((x_bd.double() - mean_d) ** 2).sum())
        n_active += ids.numel()
        n_tokens += len(x_bd)
    fired_s = torch.zeros(d_sae, dtype=torch.bool)
    for x_bd in train_nd.split(4096):
        fired_s[encode_decode(x_bd)[1]] = True
    return Score(sse / sst, n_active / n_tokens, float((~fired_s).float().mean()), seconds)


def run_sparsify(split: TokenSplit, n_tokens: int, batch_size: int, train_nd: torch.Tensor, d_sae: int, k: int,
                 input_scale: float = 1.0) -> Score:
    """sparsify's SparseCoder trained with its Trainer's default recipe on traitscope's batches."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(SEED)
    sae = SparseCoder(split.d_model, SparseCoderConfig(num_latents=d_sae, k=k), torch.device("cpu"), dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5)]), momentum=0.95)
    opt.train()
    n_steps = -(-n_tokens // batch_size)
    t0 = time.perf_counter()
    with ShuffledLoader(split, batch_size, SEED) as loader:
        for step in tqdm(range(n_steps), desc="sparsify", unit="step", mininterval=5):
            x_bd = next(loader) * input_scale
            if step == 0:
                sae.b_dec.data = x_bd.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x_bd, y=x_bd, total_variance=(x_bd - x_bd.mean(0)).pow(2).sum())
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
    seconds = time.perf_counter() - t0
    opt.eval()  # schedule-free: score the averaged weights

    def encode_decode(x_bd):
        enc = sae.encode(x_bd * input_scale)
        return sae.decode(enc.top_acts, enc.top_indices) / input_scale, enc.top_indices[enc.top_acts > 0]

    return score(encode_decode, split, train_nd, d_sae, seconds)


def run_overcomplete(split: TokenSplit, n_tokens: int, batch_size: int, train_nd: torch.Tensor, d_sae: int,
                     k: int) -> Score:
    """overcomplete's TopKSAE trained by its own `train_sae` with the recipe of its README (Adam at 5e-4,
    mean squared error, gradients clipped at norm 1, no schedule) on traitscope's batches."""
    import matplotlib
    import matplotlib.cm
    if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3.0 calls it on import; matplotlib 3.9 removed it
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE, train_sae

    torch.manual_seed(SEED)
    sae = TopKSAE(split.d_model, nb_concepts=d_sae, top_k=k)
    opt = torch.optim.Adam(sae.parameters(), lr=5e-4)
    n_steps = -(-n_tokens // batch_size)
    t0 = time.perf_counter()
    with ShuffledLoader(split, batch_size, SEED) as loader:
        batches = (next(loader) for _ in tqdm(range(n_steps), desc="overcomplete", unit="step", mininterval=5))
        train_sae(sae, batches, lambda x, x_hat, *_: (x - x_hat).square().mean(), opt, nb_epochs=1, monitoring=0)
    seconds = time.perf_counter() - t0
    sae.eval()

    def encode_decode(x_bd):
        codes_bs = sae.encode(x_bd)[1]
        return sae.decode(codes_bs), (codes_bs > 0).nonzero()[:, 1]

    return score(encode_decode, split, train_nd, d_sae, seconds)


def run_traitscope(shards: Shards, split: TokenSplit, n_tokens: int, batch_size: int, train_nd: torch.Tensor,
                   work_dpath: Path, ablations: dict[str, dict], d_sae: int, k: int) -> dict[str, Score]:
    """`traitscope train` (its Python entry point) with default settings but the ones in `ablations`,
    all SAEs in one pass over the data."""
    cfg = TrainConfig(shards=str(shards.dpath), layer=split.layer, tokens=n_tokens, batch_size=batch_size, seed=SEED,
                      val_frac=VAL_FRAC, out=str(work_dpath / "runs"), checkpoint_every=10**12)
    default_lr = RunSettings(d_sae=d_sae, k=k).resolved(split.d_model, batch_size).lr
    settings = []
    for change in ablations.values():
        change = dict(change)
        lr_scale = change.pop("lr_scale", None)
        if lr_scale is not None:
            change["lr"] = default_lr * lr_scale
        settings.append(RunSettings(d_sae=d_sae, k=k, **change))
    t0 = time.perf_counter()
    results = train(cfg, settings, echo=lambda *a, **k: print(*a, file=sys.stderr, **k))
    seconds = (time.perf_counter() - t0) / len(settings)
    scores = {}
    for name, result in zip(ablations, results):
        if result.status not in ("trained", "already trained"):
            raise SystemExit(f"traitscope run {name} {result.status}: {result.message}")
        sae = load_sae(result.dpath)

        def encode_decode(x_bd, sae=sae):
            codes_bs = sae.encode(x_bd)
            return sae.decode(codes_bs), (codes_bs > 0).nonzero()[:, 1]

        scores[name] = score(encode_decode, split, train_nd, d_sae, seconds)
        if isinstance(sae, BatchTopKSAE):  # a learned threshold (Matryoshka too): also at L0 k on held-out
            sae.threshold.fill_(held_out_cut(sae, split, k))
            scores[f"{name}, threshold for L0 {k} on held-out"] = score(encode_decode, split, train_nd, d_sae, seconds)
    return scores


@torch.inference_mode()
def held_out_cut(sae, split: TokenSplit, k: int) -> float:
    """The threshold at which the held-out tokens fire k latents each on average: their k·N-th largest
    pre-activation. The learned threshold keeps k on the training tokens, and held-out ones fire more
    (docs/training.md), so this puts a BatchTopK SAE at sparsify's L0 on the images it is scored on."""
    pre = torch.cat([sae.pre_acts(x_bd).reshape(-1) for x_bd in split.val_batches(4096, 10**9)])
    return float(pre.topk(k * (len(pre) // sae.d_sae)).values[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="camvid,fish",
                        help="comma-separated: camvid, fish (the sets beside the project), folders of images, or "
                             "shard folders (traitscope's or saev's; --model and --resolution then unused)")
    parser.add_argument("--tokens", default="512k", help="comma-separated token budgets (512k, 5M)")
    parser.add_argument("--batch-size", default=str(TrainConfig.batch_size),
                        help="tokens per step, both SAEs (comma-separated: several; default: traitscope train's)")
    parser.add_argument("--ablate", nargs="?", const="all", default="",
                        help=f"also vary traitscope's settings one at a time: 'all' or some of {', '.join(ABLATIONS)} "
                             "(comma-separated); 'all' also scales sparsify's inputs")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"the peers trained beside traitscope (comma-separated, default: {','.join(PEERS)})")
    parser.add_argument("--no-sparsify", action="store_true",
                        help="train traitscope's SAEs only, no peer (to explore ablations; every comparison needs "
                             "the peers' rows)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "traitscope-bench-sparsify"),
                        help="cache of shards and runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--d-sae", type=int, default=None,
                        help="latents of both SAEs (default: traitscope train's, 16 per dimension)")
    parser.add_argument("--k", type=int, default=K, help=f"active latents per token, both SAEs (default {K})")
    parser.add_argument("--model", default=MODEL, help=f"backbone (default {MODEL}; efficientnet-lite0 is the "
                                                       "offline CNN)")
    parser.add_argument("--layer", type=int, default=LAYER, help=f"layer whose patch tokens are modelled "
                                                                 f"(default {LAYER})")
    parser.add_argument("--resolution", type=int, default=None,
                        help="side of the model's input in pixels (default: the model's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU
    peers = [] if args.no_sparsify else list(filter(None, args.peers.split(",")))
    for peer in peers:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
        if importlib.util.find_spec(peer) is None:
            raise SystemExit(f"this benchmark runs {peer}: pip install {PEERS[peer]} (or --peers without it)")
    work_dpath = Path(args.work)
    names = list(ABLATIONS) if args.ablate == "all" else ["defaults", *filter(None, args.ablate.split(","))]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
    ablations = {n: ABLATIONS[n] for n in names}
    lines = []
    for data in args.data.split(","):
        images_dpath = SETS.get(data, Path(data))
        if not images_dpath.is_dir():
            raise SystemExit(f"no folder at {images_dpath} (--data takes {', '.join(SETS)}, folders of images "
                             "or shard folders)")
        try:  # a shard folder (traitscope's, or another tool's that traitscope opens) is used as it is
            shards = Shards(images_dpath)
        except TraitscopeError:
            shards = make_shards(images_dpath, work_dpath, args.model, args.layer, args.resolution)
        split = TokenSplit(shards, args.layer, "patches", VAL_FRAC, SEED)
        model = shards.model.get("name", "?")
        d_sae = args.d_sae or RunSettings(k=args.k).resolved(split.d_model).d_sae
        train_nd = training_tokens(split)
        ratio, dims_90 = spread(train_nd)
        print(f"{data}: {shards.n_images} images, {split.n_train_tokens:,} training tokens of {split.d_model} dims, "
              f"{len(split.val_rows)} held-out images ({shards.dpath}); participation ratio {ratio:.1f}, "
              f"{dims_90} principal directions hold 90% of the variance", file=sys.stderr)
        for n_tokens in map(parse_count, args.tokens.split(",")):
            for batch_size in map(int, args.batch_size.split(",")):
                rows = {}
                if "sparsify" in peers:
                    rows["sparsify (defaults)"] = run_sparsify(split, n_tokens, batch_size, train_nd, d_sae, args.k)
                if "overcomplete" in peers:
                    rows["overcomplete (its README's recipe)"] = run_overcomplete(split, n_tokens, batch_size,
                                                                                 train_nd, d_sae, args.k)
                if args.ablate == "all" and "sparsify" in peers:
                    scale = float(1 / train_nd.pow(2).sum(1).mean().sqrt())
                    rows["sparsify, inputs scaled to E|x|^2 = 1"] = run_sparsify(split, n_tokens, batch_size,
                                                                                  train_nd, d_sae, args.k, scale)
                for name, s in run_traitscope(shards, split, n_tokens, batch_size, train_nd, work_dpath,
                                              ablations, d_sae, args.k).items():
                    rows[f"traitscope ({name})"] = s
                lines.append(f"\n{data}, {model} layer {args.layer}, {d_sae} latents, k {args.k}, "
                             f"{n_tokens:,} tokens, batch {batch_size} ({-(-n_tokens // batch_size)} steps)")
                width = max(map(len, rows))
                lines.append(f"{'SAE':{width}s} {'val NMSE':>9s} {'L0':>6s} {'dead':>7s} {'s/run':>6s}")
                for name, s in rows.items():
                    lines.append(f"{name:{width}s} {s.nmse:9.4f} {s.l0:6.1f} {s.dead_frac:7.2%} {s.seconds:6.0f}")
                print("\n".join(lines[-len(rows) - 2:]), flush=True)
    print("\n".join(["", "summary:", *lines]))


if __name__ == "__main__":
    main()
