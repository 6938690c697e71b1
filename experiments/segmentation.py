"""Segmentation experiments: 1MD120 part 2 (FCNs on GlaS colon-gland histology, Dice score) and ADL
assignment 1 part 2 (U-Net on JSRT chest X-rays, lung masks, F1).

Both train with pixel-wise cross-entropy over two classes (softmax over channels) and report the
per-image Dice score (= F1 for binary masks) on the test split: mean, std and min over its images.
GlaS: train 85 images (15% held out as validation for early stopping), test = testA (60), resized to
128x128. JSRT: train 174 (15% validation), test = the data set's own val split (22), 256x256, 1 channel.
"""
from experiments.common import base_config, variant

FLIPS = {"augment.flip_lr": True, "augment.flip_ud": True}


def glas_fcn():
    """1MD120: the FCN (conv 8/16/32 3x3, pools, two 2x2 stride-2 transposed convs, 1x1 classifier) on GlaS at 128x128; Adam 3e-3 with cosine decay over 100 epochs, batch 8, the lowest-val-loss state kept, early stopping after 30 epochs without a lower one (report: DSC 0.70)."""
    return base_config(
        "glas_fcn", glas_fcn.__doc__,
        data=dict(name="glas", size=(128, 128), val_fraction=0.15),
        model=dict(name="fcn", activation="relu"), optimizer=dict(name="adam", lr=3e-3, schedule="cosine"),
        batch_size=8, drop_last=False, eval_batch_size=32, epochs=100, best_metric="val_loss", patience=30)


def jsrt_unet():
    """ADL assignment 1: U-Net (4 pools, 2 convs + batch norm per level, 16 maps at the top doubling per level to 128, and 128 at the bottom as in the common bilinear PyTorch U-Net, bilinear upsampling, ReLU; --model.width 64 is the original's 13.4 M weights) on JSRT lungs at 256x256x1; Adam 1e-3 with cosine decay over 20 epochs, batch 8, the best-val-F1 state kept, stopping early after 8 epochs without a higher one, 2 trials (report: F1 0.976 ± 0.013, min 0.924)."""
    return base_config(
        "jsrt_unet", jsrt_unet.__doc__,
        data=dict(name="jsrt", size=(256, 256), val_fraction=0.15),
        model=dict(name="unet", width=16, depth=4, upsample="bilinear", activation="relu"),
        optimizer=dict(name="adam", lr=1e-3, schedule="cosine"), batch_size=8, drop_last=False, eval_batch_size=8,
        epochs=20, seeds=2, best_metric="val_dice", patience=8)


def _fcn2():
    # FCN2 keeps Adam 1e-3 (with flips: DSC 0.81-0.82 there); the plain FCN, without batch norm, needed the
    # larger step (3e-3: DSC 0.69, against 0.61 at 1e-3). The plain FCN passes through an all-gland phase
    # (DSC ~0.66 for predicting every pixel gland) that a val-Dice criterion keeps, so it selects by val loss.
    return variant(glas_fcn(), "glas_fcn2", "1MD120: FCN2, the FCN with a 3x3 conv after each transposed conv and "
                   "batch norm after every conv; Adam 1e-3, the best-val-Dice state kept (report: DSC 0.80).",
                   **{"model.name": "fcn2", "optimizer.lr": 1e-3, "best_metric": "val_dice"})


def _fcn2_flips():
    return variant(_fcn2(), "glas_fcn2_flips",
                   "1MD120: FCN2 with random left-right and up-down flips of image and mask together, on device "
                   "(report: DSC 0.82).", **FLIPS)


UNET_VARIANTS = (
    {"label": "bilinear, ReLU"},
    {"label": "nearest, ReLU", "model.upsample": "nearest"},
    {"label": "bilinear, ELU", "model.activation": "elu"},
)

EXPERIMENTS = {
    "glas_fcn": glas_fcn,
    "glas_fcn2": _fcn2,
    "glas_fcn2_flips": _fcn2_flips,
    # one launch; batch sizes change shapes, so each is its own program (128 > the 72 training images:
    # one full batch per epoch, as a DataLoader that keeps its short last batch gives)
    "glas_batch_sizes": lambda: variant(_fcn2_flips(), "glas_batch_sizes", "1MD120: FCN2 with flips, batch size 8 to "
                                        "128.", sweep=tuple({"batch_size": b} for b in (8, 16, 32, 64, 128))),
    # learning rates are stacked: the four are trained as one program
    "glas_learning_rates": lambda: variant(_fcn2_flips(), "glas_learning_rates", "1MD120: FCN2 with flips, learning "
                                           "rate 1e-2 to 1e-5.",
                                           sweep=tuple({"optimizer.lr": lr} for lr in (1e-2, 1e-3, 1e-4, 1e-5))),
    "jsrt_unet": jsrt_unet,
    "jsrt_unet_nearest": lambda: variant(jsrt_unet(), "jsrt_unet_nearest", "ADL assignment 1: the U-Net with "
                                         "nearest-neighbour upsampling, 2 trials.", of=UNET_VARIANTS[1]),
    "jsrt_unet_elu": lambda: variant(jsrt_unet(), "jsrt_unet_elu", "ADL assignment 1: the U-Net with ELU "
                                     "activations, 2 trials.", of=UNET_VARIANTS[2]),
    "jsrt_unet_trials": lambda: variant(jsrt_unet(), "jsrt_unet_trials", "ADL assignment 1's table: U-Net baseline, "
                                        "nearest upsampling and ELU, 2 trials each.", sweep=UNET_VARIANTS),
}
