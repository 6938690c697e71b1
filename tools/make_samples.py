"""Rebuilds the small real samples of CIFAR-10, GTSRB, GlaS and JSRT shipped in flaxlab/assets from ../shared/data.

They let a fresh machine (and the tests) run the image experiments end to end without a download:
  python tools/make_samples.py [--shared ../shared/data]

CIFAR-10: 60 training and 20 test images per class, all from the training JPEGs (disjoint), in
`[train|test]/<class>/NNNN.jpg` form. GTSRB: per class 5 tracks of 4 images each, in the official
`GTSRB/Final_Training/Images/000NN/` layout with GT csvs, so the by-track split has tracks to split.
GlaS: the first 12 train and 6 testA images (natural order) at half the shared size (images as JPEG
quality 90, masks PNG); JSRT: 16 train and 6 val pairs at 256x256, as they are.
"""
import argparse
import io
import tarfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "flaxlab" / "assets"


def _add(tar, name, raw):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(raw), 0
    tar.addfile(info, io.BytesIO(raw))


def cifar10_sample(shared, train_per_class=60, test_per_class=20):
    out = ASSETS / "cifar10-sample" / "cifar10-sample.tar"
    out.parent.mkdir(parents=True, exist_ok=True)
    taken = {}
    with tarfile.open(shared / "cifar10-train-jpg.tar") as src, tarfile.open(out, "w") as dst:
        for m in src:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 3:
                continue
            n = taken[parts[1]] = taken.get(parts[1], 0) + 1
            if n <= train_per_class + test_per_class:
                split = "train" if n <= train_per_class else "test"
                _add(dst, f"{split}/{parts[1]}/{parts[2]}", src.extractfile(m).read())
    return out


def gtsrb_sample(shared, tracks_per_class=5, images_per_track=4):
    out = ASSETS / "gtsrb-sample" / "gtsrb-sample.tar.xz"
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    with tarfile.open(shared / "gtsrb-train-32px.tar.xz") as src:
        for m in src:
            if m.isfile():
                files[m.name] = src.extractfile(m).read()
    keep = set()
    by_class = {}
    for name in files:
        if name.endswith(".ppm"):
            folder, stem = name.split("/")[-2], name.split("/")[-1]
            by_class.setdefault(folder, {}).setdefault(stem.split("_")[0], []).append(name)
    for tracks in by_class.values():
        for track in sorted(tracks)[:tracks_per_class]:
            images = sorted(tracks[track])
            step = max(1, len(images) // images_per_track)
            keep.update(images[::step][:images_per_track])
    with tarfile.open(out, "w:xz") as dst:
        for name in sorted(files):
            if name.endswith(".csv"):
                lines = files[name].decode().splitlines()
                folder = name.rsplit("/", 1)[0]
                rows = [lines[0]] + [l for l in lines[1:] if f"{folder}/{l.split(';')[0]}" in keep]
                _add(dst, name, ("\n".join(rows) + "\n").encode())
            elif name in keep:
                _add(dst, name, files[name])
    return out


def _segmentation_sample(source, out, keep, shrink):
    """Pairs `SPLIT/{images,masks}/NAME` whose (split, name) `keep` accepts; `shrink` halves them (GlaS)."""
    from PIL import Image
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as src, tarfile.open(out, "w:gz") as dst:
        members = sorted((m for m in src if m.isfile()), key=lambda m: m.name)
        for m in members:
            parts = m.name.split("/")  # ROOT/SPLIT/KIND/NAME
            if len(parts) != 4 or not keep(parts[1], parts[3].rsplit(".", 1)[0]):
                continue
            raw, name = src.extractfile(m).read(), "/".join(parts[1:])
            if shrink:
                im = Image.open(io.BytesIO(raw))
                im = im.resize((im.width // 2, im.height // 2), Image.BILINEAR if parts[2] == "images" else Image.NEAREST)
                buffer = io.BytesIO()
                if parts[2] == "images":
                    im.convert("RGB").save(buffer, "JPEG", quality=90)
                    name = name.rsplit(".", 1)[0] + ".jpg"
                else:
                    im.save(buffer, "PNG", optimize=True)
                raw = buffer.getvalue()
            _add(dst, name, raw)
    return out


def glas_sample(shared, train=12, test=6):
    wanted = lambda split, name: int(name.split("_")[1]) <= (train if split == "train" else test)  # noqa: E731
    return _segmentation_sample(shared / "glas-half-train-testA.tar.gz", ASSETS / "glas-sample" / "glas-sample.tar.gz",
                                wanted, shrink=True)


def jsrt_sample(shared, train=16, val=6):
    with tarfile.open(shared / "jsrt-lungs-256-trainval.tar.gz") as src:
        names = {}
        for m in src:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[2] == "images":
                names.setdefault(parts[1], []).append(parts[3].rsplit(".", 1)[0])
    chosen = {split: set(sorted(n)[:train if split == "train" else val]) for split, n in names.items()}
    return _segmentation_sample(shared / "jsrt-lungs-256-trainval.tar.gz", ASSETS / "jsrt-sample" / "jsrt-sample.tar.gz",
                                lambda split, name: name in chosen.get(split, ()), shrink=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=Path(__file__).resolve().parent.parent.parent / "shared" / "data", type=Path)
    args = parser.parse_args()
    for path in (cifar10_sample(args.shared), gtsrb_sample(args.shared), glas_sample(args.shared),
                 jsrt_sample(args.shared)):
        print(f"{path.relative_to(ASSETS.parent.parent)}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
