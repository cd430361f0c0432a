"""traitscope's SAE import/export against the real libraries: SAELens, sparsify and saev write and load
files with their own code, and their codes and reconstructions are compared with traitscope's.

Runs in a separate venv that has the peers (see benchmarks/requirements-interop.txt), with
traitscope's sources on the path:

    PYTHONPATH=src /work/wt/peer-venv/bin/python benchmarks/check_interop.py
    PYTHONPATH=src /work/wt/peer-venv/bin/python benchmarks/check_interop.py --saev-src /path/to/saev/src
    PYTHONPATH=src /work/wt/peer-venv/bin/python benchmarks/check_interop.py --write-fixtures tests/interop/data

saev on PyPI is 0.1.0 (checkpoints without a schema); `--saev-src` points at a checkout of saev's
current sources (schema 5), whose nn package is imported from there (run it as its own pass: both
are the package `saev`). `--write-fixtures` also saves tiny folders written by each peer, with the
peer's codes and reconstructions, which tests/interop/test_interop.py imports in the project's own venv.
Prints one line per check: the largest absolute difference in codes and reconstructions.
"""

import argparse
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from traitscope.interop import read_foreign_sae
from traitscope.interop.saelens import write_saelens
from traitscope.interop.sparsify import write_sparsify
from traitscope.sae import SAEConfig, build_sae

D, S, K, N = 32, 128, 8, 512
TOL = 1e-4
RESULTS: list[tuple[str, float, float, bool]] = []


def inputs(n=N, d=D, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def randomize_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "b_" in name or "bias" in name else 1 / D ** 0.5))
    return module


def report(name, codes_theirs, codes_ours, recon_theirs, recon_ours):
    dc = float((codes_theirs - codes_ours).abs().max())
    dr = float((recon_theirs - recon_ours).abs().max())
    ok = dc <= TOL and dr <= TOL
    RESULTS.append((name, dc, dr, ok))
    l0 = float((codes_theirs != 0).sum(1).float().mean())
    print(f"{'ok  ' if ok else 'FAIL'} {name:58s} max|Δcodes| {dc:.2e}  max|Δrecon| {dr:.2e}  (L0 {l0:.1f})", flush=True)


def ours(sae, x):
    with torch.no_grad():
        codes = sae.encode(x)
        return codes, sae.decode(codes)


def fixture(out: Path | None, name: str, src: Path, x, codes, recon):
    """Copy a peer-written folder or file to out/name with the peer's codes on x (tiny sizes only)."""
    if out is None:
        return
    import shutil

    dst = out / name
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    if src.is_dir():
        shutil.copytree(src, dst / "sae")
    else:
        shutil.copyfile(src, dst / src.name)
    save_file({"x": x.contiguous(), "codes": codes.contiguous(), "recon": recon.contiguous()},
              str(dst / "expected.safetensors"))


# --- SAELens ---

def check_saelens(tmp: Path, fixtures: Path | None):
    import sae_lens
    from sae_lens import (SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                          TopKSAEConfig)
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    print(f"SAELens {sae_lens.__version__}")
    x = inputs()
    cases = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=S)),
        "standard, apply_b_dec_to_input=False": StandardSAE(StandardSAEConfig(d_in=D, d_sae=S,
                                                                              apply_b_dec_to_input=False)),
        "topk, rescale_acts_by_decoder_norm": TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=K,
                                                                    rescale_acts_by_decoder_norm=True)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=S, k=K)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=S)),
    }
    for i, (name, sae) in enumerate(cases.items()):
        randomize_(sae, i)
        if hasattr(sae, "threshold"):
            with torch.no_grad():
                sae.threshold.copy_(torch.rand(S, generator=torch.Generator().manual_seed(9)) * 0.8)
        dpath = tmp / f"saelens-{i}"
        sae.save_model(dpath)
        loaded = SAE.load_from_disk(dpath)
        with torch.no_grad():
            codes = loaded.encode(x)
            recon = loaded.decode(codes)
        c, r = ours(read_foreign_sae(f"saelens:{dpath}").sae, x)
        report(f"SAELens {name} -> traitscope", codes, c, recon, r)
        if name == "topk, rescale_acts_by_decoder_norm":
            small = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3, rescale_acts_by_decoder_norm=True))
            randomize_(small, 42).save_model(tmp / "saelens-small")
            xs = inputs(16, 8, seed=3)
            loaded = SAE.load_from_disk(tmp / "saelens-small")
            with torch.no_grad():
                c = loaded.encode(xs)
                fixture(fixtures, "saelens-topk-rescaled", tmp / "saelens-small", xs, c, loaded.decode(c))

    # a BatchTopK training SAE saved for inference (SAELens turns it into jumprelu)
    train_sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=S, k=K))
    randomize_(train_sae, 7)
    with torch.no_grad():
        train_sae.topk_threshold.fill_(0.6)
    train_sae.save_inference_model(tmp / "saelens-btk")
    loaded = SAE.load_from_disk(tmp / "saelens-btk")
    with torch.no_grad():
        codes = loaded.encode(x)
        recon = loaded.decode(codes)
    mine = read_foreign_sae(f"saelens:{tmp / 'saelens-btk'}").sae
    c, r = ours(mine, x)
    report("SAELens batchtopk (save_inference_model) -> traitscope", codes, c, recon, r)

    # traitscope -> SAELens
    for variant in ("relu", "topk", "batchtopk", "matryoshka"):
        sae = build_sae(SAEConfig(variant, D, S, k=None if variant == "relu" else K))
        randomize_(sae, 11)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.5)
        sae.eval()
        dpath = tmp / f"ours-saelens-{variant}"
        write_saelens(sae, dpath, {"model_name": "dinov2-vits14-reg", "hook_name": "blocks.10.patches"})
        loaded = SAE.load_from_disk(dpath)
        with torch.no_grad():
            codes = loaded.encode(x)
            recon = loaded.decode(codes)
        c, r = ours(sae, x)
        report(f"traitscope {variant} -> SAELens {loaded.cfg.architecture()}", codes, c, recon, r)


# --- sparsify ---

def check_sparsify(tmp: Path, fixtures: Path | None):
    import os

    if not torch.cuda.is_available():  # sparsify's Triton decoder needs a GPU; its eager decoder is the same sum
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    print(f"sparsify {importlib.metadata.version('eai-sparsify')}")
    x = inputs()

    def dense(coder, x):
        with torch.no_grad():
            out = coder.encode(x)
            codes = torch.zeros(x.shape[0], coder.num_latents).scatter_(1, out.top_indices, out.top_acts)
            return codes, coder.decode(out.top_acts, out.top_indices)

    coder = randomize_(SparseCoder(D, SparseCoderConfig(num_latents=S, k=K)), 3)
    coder.save_to_disk(tmp / "sparsify")
    loaded = SparseCoder.load_from_disk(tmp / "sparsify")
    codes, recon = dense(loaded, x)
    c, r = ours(read_foreign_sae(f"sparsify:{tmp / 'sparsify'}").sae, x)
    report("sparsify topk -> traitscope", codes, c, recon, r)
    small = randomize_(SparseCoder(8, SparseCoderConfig(num_latents=16, k=3)), 5)
    small.save_to_disk(tmp / "sparsify-small")
    xs = inputs(16, 8, seed=3)
    fixture(fixtures, "sparsify-topk", tmp / "sparsify-small", xs, *dense(SparseCoder.load_from_disk(tmp / "sparsify-small"), xs))

    sae = randomize_(build_sae(SAEConfig("topk", D, S, k=K)), 13).eval()
    write_sparsify(sae, tmp / "ours-sparsify")
    codes, recon = dense(SparseCoder.load_from_disk(tmp / "ours-sparsify"), x)
    c, r = ours(sae, x)
    report("traitscope topk -> sparsify", codes, c, recon, r)


# --- saev ---

def check_saev(tmp: Path, fixtures: Path | None):
    import saev

    print(f"saev from {Path(saev.__file__).parent}")
    x = inputs()
    try:
        from saev.nn import modeling  # current sources (schema 5)
    except ImportError:
        modeling = None
    if modeling is None:  # PyPI saev 0.1.0: ReLU, b_dec subtracted, header without a schema
        from saev import config, nn

        sae = randomize_(nn.SparseAutoencoder(config.SparseAutoencoder(d_vit=D, exp_factor=S // D)), 17)
        nn.dump(str(tmp / "saev01" / "sae.pt"), sae)
        loaded = nn.load(str(tmp / "saev01" / "sae.pt"))
        with torch.no_grad():
            recon, codes, _ = loaded(x)
        c, r = ours(read_foreign_sae(f"saev:{tmp / 'saev01' / 'sae.pt'}").sae, x)
        report("saev 0.1.0 relu (nn.dump, no schema) -> traitscope", codes, c, recon, r)
        small = randomize_(nn.SparseAutoencoder(config.SparseAutoencoder(d_vit=8, exp_factor=2)), 19)
        nn.dump(str(tmp / "saev01-small" / "sae.pt"), small)
        xs = inputs(16, 8, seed=3)
        with torch.no_grad():
            rs, cs, _ = nn.load(str(tmp / "saev01-small" / "sae.pt"))(xs)
        fixture(fixtures, "saev-0.1.0-relu", tmp / "saev01-small" / "sae.pt", xs, cs, rs)
        return
    acts = {"relu": modeling.Relu(), "topk": modeling.TopK(top_k=K), "batchtopk": modeling.BatchTopK(top_k=K)}
    for i, (name, act) in enumerate(acts.items()):
        cfg = modeling.SparseAutoencoderConfig(d_model=D, d_sae=S, activation=act)
        sae = randomize_(modeling.SparseAutoencoder(cfg), 21 + i)
        if name == "batchtopk":
            sae.activation.threshold.fill_(0.7)
        modeling.dump(tmp / f"saev-{name}.pt", sae)
        loaded = modeling.load(tmp / f"saev-{name}.pt").eval()
        with torch.no_grad():
            codes = loaded.encode(x).f_x
            recon = loaded.decode(codes)[:, -1]
        c, r = ours(read_foreign_sae(f"saev:{tmp / f'saev-{name}.pt'}").sae, x)
        n_neg = int((codes < 0).any(1).sum())
        report(f"saev schema {modeling.SCHEMA_VERSION} {name} -> traitscope"
               + (f" ({n_neg} tokens with negative TopK values)" if name == "topk" else ""), codes, c, recon, r)
        if fixtures is not None and name == "batchtopk":
            small = randomize_(modeling.SparseAutoencoder(modeling.SparseAutoencoderConfig(
                d_model=8, d_sae=16, activation=modeling.BatchTopK(top_k=3))), 23)
            small.activation.threshold.fill_(0.4)
            modeling.dump(tmp / "saev-small.pt", small)
            xs = inputs(16, 8, seed=3)
            loaded = modeling.load(tmp / "saev-small.pt").eval()
            with torch.no_grad():
                cs = loaded.encode(xs).f_x
                fixture(fixtures, f"saev-schema{modeling.SCHEMA_VERSION}-batchtopk", tmp / "saev-small.pt", xs, cs,
                        loaded.decode(cs)[:, -1])


def check_saev_shards(tmp: Path, fixtures: Path | None):
    """saev 0.1.0's ShardWriter writes shards of an image folder; its Dataset and traitscope read them."""
    import saev
    from PIL import Image

    if not hasattr(saev, "activations"):
        try:
            from saev import activations, config  # noqa: F401
        except ImportError as err:
            print(f"skip saev shards: {err}")
            return
    from saev import activations, config

    root = tmp / "photos"
    for c, n in (("cod", 5), ("eel", 4), ("pike", 3)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / c / f"{i:02d}.png")
    layers, n_p, d = [8, 10], 16, 24
    cfg = config.Activations(data=config.ImageFolderDataset(root=str(root)), dump_to=str(tmp / "saev-shards"),
                             vit_family="dinov2", vit_ckpt="dinov2_vits14_reg", d_vit=d, vit_layers=layers,
                             n_patches_per_img=n_p, cls_token=True, n_patches_per_shard=5 * len(layers) * (n_p + 1),
                             device="cpu")
    acts = torch.randn(12, len(layers), n_p + 1, d, generator=torch.Generator().manual_seed(4))
    writer = activations.ShardWriter(cfg)
    for a in range(0, 12, 4):
        writer[a:a + 4] = acts[a:a + 4]
    writer.flush()
    from traitscope.shards import Shards

    mine = Shards(writer.root)
    theirs_p = activations.Dataset(config.DataLoad(shard_root=writer.root, patches="patches", layer=10,
                                                   scale_mean=False, scale_norm=False))
    theirs_c = activations.Dataset(config.DataLoad(shard_root=writer.root, patches="cls", layer=10,
                                                   scale_mean=False, scale_norm=False))
    p = np.stack([theirs_p[i]["act"].numpy() for i in range(len(theirs_p))])
    c = np.stack([theirs_c[i]["act"].numpy() for i in range(len(theirs_c))])
    dp = float(np.abs(p - mine.acts(10, "patches")[:]).max())
    dc = float(np.abs(c - mine.acts(10, "cls")[:]).max())
    order = [str(Path(path).relative_to(root)) for path, _ in activations.ImageFolder(str(root)).samples]
    same_order = [r["path"] for r in mine.images] == order
    ok = dp == 0 and dc == 0 and same_order and len(p) == 12 * n_p
    RESULTS.append(("saev 0.1.0 shards", dp, dc, ok))
    if fixtures is not None:  # a tiny copy: 5 images, 1 layer, 4 patches + CLS, width 8, 2 per shard
        small = config.Activations(data=config.ImageFolderDataset(root=str(root / "cod")), dump_to=str(tmp / "small"),
                                   vit_family="dinov2", vit_ckpt="dinov2_vits14_reg", d_vit=8, vit_layers=[-2],
                                   n_patches_per_img=4, cls_token=True, n_patches_per_shard=2 * 5, device="cpu")
        w = activations.ShardWriter(small)
        w[0:5] = torch.randn(5, 1, 5, 8, generator=torch.Generator().manual_seed(6))
        w.flush()
        read = {k: activations.Dataset(config.DataLoad(shard_root=w.root, patches=k, layer=-2, scale_mean=False,
                                                       scale_norm=False)) for k in ("patches", "cls")}
        expected = {k: torch.stack([ds[i]["act"] for i in range(len(ds))]) for k, ds in read.items()}
        import shutil

        dst = fixtures / "saev-0.1.0-shards"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(w.root, dst / "shards")
        save_file({k: v.contiguous() for k, v in expected.items()}, str(dst / "expected.safetensors"))
    print(f"{'ok  ' if ok else 'FAIL'} saev 0.1.0 ShardWriter -> traitscope Shards: {len(p)} patch rows "
          f"max|Δ| {dp:.1e}, {len(c)} CLS rows max|Δ| {dc:.1e}, image order = saev's ImageFolder: {same_order}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saev-src", type=Path, default=None, help="a checkout's src/ holding saev's current sources")
    parser.add_argument("--only", choices=("saelens", "sparsify", "saev"), action="append", default=None)
    parser.add_argument("--write-fixtures", type=Path, default=None, help="write tiny peer-made fixtures here")
    args = parser.parse_args()
    if args.saev_src:
        sys.path.insert(0, str(args.saev_src))
    torch.manual_seed(0)
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (("saelens", check_saelens), ("sparsify", check_sparsify), ("saev", check_saev),
                            ("saev", check_saev_shards)):
            if args.only and name not in args.only:
                continue
            check(Path(tmp), args.write_fixtures)
    n_fail = sum(not ok for *_, ok in RESULTS)
    print(json.dumps({"checks": len(RESULTS), "failed": n_fail, "tolerance": TOL}))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
