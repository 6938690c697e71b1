"""GTSRB experiments of ADL assignment 1: the traffic-sign CNN (43 classes, 28x28x3) with Adam, batch
norm, SGD and Rprop, three trials each, in the report's table (test accuracy per trial, mean ± std).

Validation and test splits are held out of the training set by track (the ~30 photos of one sign
are near-duplicates), unless the official test set is in --data-dir. No flips: a mirrored sign can
mean another sign (keep left / keep right).
"""
from experiments.common import base_config, variant


def gtsrb_cnn():
    """ADL assignment 1 baseline: conv 64 5x5, conv 32 5x5, pool, conv 32 3x3, pool, linear 512-43; Adam 1e-3, batch 64, 3 trials (report: 95.9%)."""
    return base_config(
        "gtsrb_cnn", gtsrb_cnn.__doc__,
        data=dict(name="gtsrb", size=(28, 28), val_fraction=0.2, test_fraction=0.2),
        model=dict(name="gtsrb_cnn", activation="relu"), optimizer=dict(name="adam", lr=1e-3),
        batch_size=64, epochs=10, seeds=3, best_metric="val_accuracy", checkpoint_every=1)


VARIANTS = (
    {"label": "baseline (Adam)"},
    {"label": "batch norm", "model.name": "gtsrb_cnn_bn"},
    {"label": "SGD", "optimizer.name": "sgd", "optimizer.lr": 0.01, "optimizer.momentum": 0.9},
    {"label": "Rprop", "optimizer.name": "rprop", "optimizer.lr": 1e-3},
)

EXPERIMENTS = {
    "gtsrb_cnn": gtsrb_cnn,
    "gtsrb_cnn_bn": lambda: variant(gtsrb_cnn(), "gtsrb_cnn_bn", "ADL assignment 1: the GTSRB CNN with batch norm "
                                    "after each conv; Adam 1e-3, 3 trials.", of=VARIANTS[1]),
    "gtsrb_cnn_sgd": lambda: variant(gtsrb_cnn(), "gtsrb_cnn_sgd", "ADL assignment 1: the GTSRB CNN with SGD "
                                     "(lr 0.01, momentum 0.9), 3 trials.", of=VARIANTS[2]),
    "gtsrb_cnn_rprop": lambda: variant(gtsrb_cnn(), "gtsrb_cnn_rprop", "ADL assignment 1: the GTSRB CNN with Rprop "
                                       "(initial step 1e-3) on mini-batches, 3 trials.", of=VARIANTS[3]),
    "gtsrb_cnn_augment": lambda: variant(
        gtsrb_cnn(), "gtsrb_cnn_augment", "The GTSRB baseline with augmentation on device (no flips): shifts of up "
        "to 2 pixels, rotations of up to 10 degrees, brightness and contrast x[0.7, 1.3]; 15 epochs.",
        **{"augment.crop": 2, "augment.rotate": 10.0, "augment.jitter": 0.3, "epochs": 15}),
    "gtsrb_cnn_long": lambda: variant(
        gtsrb_cnn(), "gtsrb_cnn_long", "The GTSRB baseline network trained longer: the augmentation of "
        "gtsrb_cnn_augment, per-image histogram equalisation, Adam 1e-3 with cosine decay over 80 epochs.",
        **{"augment.crop": 2, "augment.rotate": 10.0, "augment.jitter": 0.3, "data.equalize_histograms": True,
           "optimizer.schedule": "cosine", "epochs": 80}),
    "gtsrb_trials": lambda: variant(gtsrb_cnn(), "gtsrb_trials", "ADL assignment 1's table: baseline, batch norm, "
                                    "SGD and Rprop, 3 trials each, test accuracy per trial and mean ± std.",
                                    sweep=VARIANTS),
}
