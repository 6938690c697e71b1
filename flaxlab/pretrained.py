"""ImageNet-pretrained ResNet-18 and VGG-19 with torchvision's layer structure, and a converter from a
torchvision state_dict to flax variables, for fine-tuning offline (TDT4265 task 4, AI604 problem 4).

Module names mirror torchvision's keys (`layer1.0.conv1.weight` is `layer1_0/conv1/kernel`), so
the converter is one rule per tensor kind: conv OIHW -> HWIO, linear transposed, batch norm
weight -> scale and running statistics -> batch_stats (eps 1e-5; torch momentum 0.1 = flax 0.9),
`num_batches_tracked` dropped. Padding is explicit and symmetric as in torch (SAME would pad a
stride-2 conv asymmetrically). VGG's first classifier weight is permuted from torch's CHW flattening
to NHWC's HWC. Inputs are resized and normalised inside the model, so inside the jitted step: a
32x32 CIFAR-10 set stays 32x32 on the device and is never stored at 224x224. A fresh init is
torchvision's (`weights=None`), so a from-scratch run starts where the reports' did.
"""
import os
import pickle
import re
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlab.data import cache_dir
from flaxlab.errors import DataError, UsageError
from flaxlab.inits import torch_bias_init, torch_kernel_init, torchvision_conv_init, torchvision_vgg_dense_init
from flaxlab.pooling import max_pool, max_pool_strided

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's published ImageNet weights (IMAGENET1K_V1)
WEIGHT_URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
               "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"}
VGG19_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                  512, 512, 512, 512, "M")


def _batch_norm(train, name):
    from flaxlab.models import batch_norm  # here, not above: flaxlab.models imports this module
    return batch_norm(train, name)


class Conv2d(nn.Module):
    """torch.nn.Conv2d's parameters (a kernel, a bias if asked) from torchvision's init. On a CPU computed as
    flaxlab's own networks' convs are (`models.conv2d`: oneDNN's on x86, as PyTorch's are; with flaxlab's
    batch norm and strided convs' images computed once, ResNet-18's fine-tuning step at 224 went from 10.1 to
    13.7 images/s on a 2-core EPYC, PyTorch's 17.3).
    Elsewhere XLA's: the GPU paths of `models.conv2d` were measured on the course networks only."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        from flaxlab.models import add_bias, conv2d  # here, not above: flaxlab.models imports this module
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param("kernel", torchvision_conv_init, (k, k, x.shape[-1], self.features))
        if jax.default_backend() == "cpu":
            y = conv2d(x, kernel, s, p)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), [(p, p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return add_bias(y, self.param("bias", nn.initializers.zeros, (self.features,))) if self.use_bias else y


def _conv(features, kernel, stride=1, padding=0, bias=False, name=None):
    return Conv2d(features, kernel, stride, padding, bias, name=name)


def prepare_input(x, size, normalize):
    """[0, 1] images -> resized (bilinear, on device) and ImageNet-normalised, as torchvision's transforms."""
    if size and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=False)
    if x.shape[-1] == 1:  # greyscale into a 3-channel net
        x = jnp.repeat(x, 3, axis=-1)
    if normalize:
        x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
    return x


class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.relu(_batch_norm(train, "bn1")(_conv(self.features, 3, self.stride, 1, name="conv1")(x)))
        y = _batch_norm(train, "bn2")(_conv(self.features, 3, 1, 1, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _batch_norm(train, "downsample_1")(_conv(self.features, 1, self.stride, name="downsample_0")(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """torchvision's resnet18: 7x7/2 conv, 3x3/2 max pool, 4 stages of 2 basic blocks, global average, fc."""
    num_classes: int = 1000
    input_size: int = 224  # images are resized to this inside the model (0: as they come)
    normalize: bool = True  # ImageNet mean/std

    @nn.compact
    def __call__(self, x, train=False):
        x = prepare_input(x, self.input_size, self.normalize)
        x = nn.relu(_batch_norm(train, "bn1")(_conv(64, 7, 2, 3, name="conv1")(x)))
        x = max_pool_strided(x, 3, 2, 1)
        for stage, features in enumerate((64, 128, 256, 512), 1):
            for block in range(2):
                stride = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(features, stride, name=f"layer{stage}_{block}")(x, train)
        # torchvision leaves the fc layer at torch.nn.Linear's default
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init, bias_init=torch_bias_init(x.shape[-1]),
                        name="fc")(x.mean(axis=(1, 2)))


def adaptive_avg_pool(x, size):
    """torch's AdaptiveAvgPool2d: output cell i averages rows floor(i*H/size) .. ceil((i+1)*H/size)."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x
    rows = [(i * h // size, -(-(i + 1) * h // size)) for i in range(size)]
    cols = [(j * w // size, -(-(j + 1) * w // size)) for j in range(size)]
    return jnp.stack([jnp.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in cols], axis=1)
                      for r0, r1 in rows], axis=1)


class VGG19(nn.Module):
    """torchvision's vgg19 (no batch norm): 16 3x3 convs in 5 blocks, 7x7 adaptive average, 3 linear layers
    with dropout 0.5; `hidden` is 4096 there (smaller only in tests)."""
    num_classes: int = 1000
    input_size: int = 224
    normalize: bool = True
    hidden: int = 4096
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train=False):
        x = prepare_input(x, self.input_size, self.normalize)
        for index, layer in enumerate(_vgg_feature_indices()):
            if layer == "M":
                x = max_pool(x, 2)
            else:
                x = nn.relu(_conv(layer[1], 3, 1, 1, bias=True, name=f"features_{layer[0]}")(x))
        x = adaptive_avg_pool(x, 7).reshape(x.shape[0], -1)  # flattened H, W, C (converter permutes)
        for i, width in ((0, self.hidden), (3, self.hidden)):
            x = nn.relu(nn.Dense(width, kernel_init=torchvision_vgg_dense_init, name=f"classifier_{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=torchvision_vgg_dense_init, name="classifier_6")(x)


def _vgg_feature_indices():
    """VGG19_FEATURES with torchvision's `features` indices: (index, maps) per conv (ReLU at index+1), "M" pools."""
    out, index = [], 0
    for layer in VGG19_FEATURES:
        out.append("M" if layer == "M" else (index, layer))
        index += 1 if layer == "M" else 2
    return out


ARCHITECTURES = {"resnet18": ResNet18, "vgg19": VGG19}
HEADS = {"resnet18": "fc", "vgg19": "classifier_6"}  # replaced (random) when the class count differs


def _flax_path(key):
    """'layer1.0.downsample.1.running_mean' -> ('layer1_0', 'downsample_1'), 'running_mean'."""
    *modules, leaf = key.split(".")
    path = []
    for part in modules:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path), leaf


def convert_state_dict(state_dict, arch="resnet18"):
    """A torchvision state_dict ({name: array}) to flax {"params", "batch_stats"} of ARCHITECTURES[arch]."""
    params, stats = {}, {}

    def put(tree, path, leaf, value):
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value, jnp.float32)

    for key, value in state_dict.items():
        value = np.asarray(value, np.float32) if not hasattr(value, "numpy") else value.detach().cpu().numpy()
        path, leaf = _flax_path(key)
        if leaf == "num_batches_tracked":
            continue
        if not np.isfinite(value).all():  # trained from, it gave a NaN loss and a divergence warning at most
            raise DataError(f"the {arch} weights' {key} holds NaN or infinite values: a damaged file?")
        if leaf in ("running_mean", "running_var"):
            put(stats, path, "mean" if leaf == "running_mean" else "var", value)
        elif leaf == "weight" and value.ndim == 4:
            put(params, path, "kernel", value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        elif leaf == "weight" and value.ndim == 2:
            if arch == "vgg19" and path == ("classifier_0",):  # torch flattens C, H, W; NHWC flattens H, W, C
                out = value.shape[0]
                if value.shape[1] != 512 * 7 * 7:  # e.g. a CIFAR VGG's 512 inputs
                    raise DataError(f"the vgg19 weights' {key} has shape {value.shape}: torchvision's VGG-19 takes "
                                    "512x7x7 = 25088 inputs there; a file of another VGG?")
                value = value.reshape(out, 512, 7, 7).transpose(0, 2, 3, 1).reshape(out, -1)
            put(params, path, "kernel", value.T)
        elif leaf == "weight":  # batch norm
            put(params, path, "scale", value)
        elif leaf == "bias":
            put(params, path, "bias", value)
        else:
            raise DataError(f"unexpected tensor '{key}' in the {arch} weights")
    return {"params": params, "batch_stats": stats} if stats else {"params": params}


def _torch_load_failure(error, path):
    """Why torch.load refused a file, in words: its messages advise unpickling the file (advice not to follow
    for a weights file, with terminal colour codes), stop mid-sentence, or are a bare number. Its unpickler
    refuses random bytes as it refuses a whole model: torch.save writes a zip archive (or, before torch 1.6, a
    pickle, which starts with byte 0x80)."""
    text = str(error)
    with open(path, "rb") as f:
        saved_by_torch = zipfile.is_zipfile(path) or f.read(1) == b"\x80"
    if saved_by_torch and ("weights only load failed" in text.lower() or "weights_only" in text):
        return ("it holds pickled Python objects (a whole model, saved with torch.save(model)?), not only tensors: "
                "save model.state_dict() instead")
    if "zip archive" in text or "central directory" in text:
        return "not a whole file of torch.save's (cut short or damaged)"
    return "not a file torch.save wrote, or a damaged one"


def read_state_dict(path):
    """A state_dict from a .pth (torch.save; needs torch), .npz or .safetensors file, as numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and advise unpickling it
                raise DataError(f"cannot read weights from {path}: not an .npz archive (numpy.savez writes them)")
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        if suffix == ".safetensors":
            try:
                from safetensors.numpy import load_file
            except ImportError:
                raise UsageError("reading .safetensors needs `pip install safetensors`") from None
            return load_file(str(path))
        if suffix in (".pth", ".pt", ".bin"):
            try:
                import torch
            except ImportError:
                raise UsageError(f"reading {path.name} needs torch (`pip install torch`), or convert it to .npz") from None
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch's own errors: its unpickler's, a zip reader's, a bare KeyError
                raise DataError(f"cannot read weights from {path}: {_torch_load_failure(e, path)}") from None
            for wrapper in ("state_dict", "model_state_dict", "model"):  # a training script's checkpoint
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
            if not isinstance(state, dict):
                raise DataError(f"cannot read weights from {path}: it holds a {type(state).__name__}, not a "
                                f"state dict (names to tensors)")
            if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
                state = {k[len("module."):]: v for k, v in state.items()}
            # bfloat16 has no numpy dtype (a TypeError's traceback): every float tensor as float32
            return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()
                    if hasattr(v, "numpy")}
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, KeyError, pickle.UnpicklingError) as e:
        why = str(e).splitlines()[0][:200]
        if "allow_pickle" in why:  # numpy's advice (allow_pickle=True) neither
            why = "it holds pickled objects, not arrays"
        raise DataError(f"cannot read weights from {path}: {why}") from None
    raise UsageError(f"weights file {path}: expected .pth, .npz or .safetensors")


def fetch_weights(arch, weights=""):
    """The weights file: `weights` when given, else torchvision's published file, downloaded into the cache once."""
    if weights:
        return Path(weights).expanduser()
    url = WEIGHT_URLS[arch]
    target = cache_dir() / "weights" / url.rsplit("/", 1)[1]
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # $FLAXLAB_CACHE a file, or unwritable
        raise UsageError(f"cannot make {target.parent} for the {arch} weights ({e.strerror}): set FLAXLAB_CACHE "
                         "to a writable folder, or pass --model.weights PATH") from None
    tmp = target.with_suffix(f".{socket.gethostname()}.{os.getpid()}.part")  # launches or hosts fetching at once
    try:
        urllib.request.urlretrieve(url, tmp)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"no {arch} weights here and no download ({getattr(e, 'reason', e)}): fetch {url} on a "
                        f"machine with internet and pass it with --model.weights PATH (or put it at {target})") from None
    os.replace(tmp, target)
    return target


def pretrained_variables(arch, weights=""):
    """Converted ImageNet variables of `arch`, from `weights` or torchvision's published file."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"no pretrained weights for '{arch}'; known: {', '.join(ARCHITECTURES)}")
    return convert_state_dict(read_state_dict(fetch_weights(arch, weights)), arch)


def merge_pretrained(variables, pretrained, arch):
    """`variables` (a fresh init) with every pretrained tensor of the same shape put in; the head keeps its
    fresh init when the class count differs. Raises when anything else does not fit."""
    head = HEADS[arch]

    def names(keys, path):
        keys = sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])  # 2 < 10
        return ", ".join(_torch_name(path + (k,)) for k in keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6
                                                                     else "")

    def merge(fresh, loaded, path=()):
        if not isinstance(fresh, dict):
            if not hasattr(loaded, "shape") or fresh.shape != loaded.shape:
                if path[0] == head and getattr(loaded, "shape", ())[:-1] == fresh.shape[:-1]:  # a new class count
                    return fresh
                shape = _torch_shape(loaded.shape) if hasattr(loaded, "shape") else "of its own (a module's tensors)"
                raise DataError(f"pretrained {_torch_name(path)} has shape {shape}, the model's "
                                f"{_torch_shape(fresh.shape)}")
            return loaded.astype(fresh.dtype)
        if not isinstance(loaded, dict):  # a 3-D 'weight', stored as a batch norm's scale
            raise DataError(f"pretrained {_torch_name(path)} is one tensor of shape {loaded.shape}, where the model "
                            f"has {names(fresh, path)}")
        if path == (head,):
            kernel, bias = (getattr(loaded.get(k), "shape", None) for k in ("kernel", "bias"))
            if kernel and bias and kernel[-1:] != bias:
                raise DataError(f"the {arch} weights' {_torch_name(path + ('kernel',))} has {kernel[-1]} classes, "
                                f"its {_torch_name(path + ('bias',))} {bias[0]}: a damaged file?")
        missing, extra = set(fresh) - set(loaded), set(loaded) - set(fresh)
        if missing or extra:  # extra: ResNet-34's blocks beyond ResNet-18's went unused, unsaid
            raise DataError(f"the {arch} weights " + "; ".join(
                ([f"lack {names(missing, path)}"] if missing else [])
                + ([f"hold {names(extra, path)}, which {arch} has not"] if extra else []))
                + ": a file of another network?")
        return {k: merge(v, loaded[k], path + (k,)) for k, v in fresh.items()}
    # the parameters first: a file of another network holds other layers, which its statistics would not say
    return {collection: merge(dict(variables[collection]), pretrained.get(collection, {}))
            for collection in sorted(variables, key=lambda c: c != "params")}


def _torch_name(path):
    """('layer2_0', 'conv1', 'kernel') -> 'layer2.0.conv1.weight', as the file names it."""
    *modules, leaf = [re.sub(r"_(\d+)$", r".\1", part) for part in path]
    return ".".join(modules + [{"kernel": "weight", "scale": "weight", "mean": "running_mean",
                                "var": "running_var"}.get(leaf, leaf)])


def _torch_shape(shape):
    """A flax kernel's shape as torch holds it: HWIO -> OIHW, (in, out) -> (out, in)."""
    shape = tuple(shape)
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1] if len(shape) == 2 else shape
