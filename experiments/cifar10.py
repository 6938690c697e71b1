"""CIFAR-10 experiments of three courses: TDT4265 assignment 3 (task 2's CNN with early stopping, and
task 3's improved models), BS6207 (the all-convolutional net, with and without batch norm) and AI604
(VGG-19 from scratch).

Without the official test batch in --data-dir, 10% of the training set is held out as test, and a
further 10% as validation, both stratified by class; the source line of every run says so.
"""
from experiments.common import base_config, variant

CROP_AND_FLIP = {"crop": 4, "flip_lr": True}  # pad 4 + random 32x32 crop, left-right flips: on device


def tdt4265_cnn():
    """TDT4265 task 2: conv 32/64/128 5x5 pad 2, each with ReLU and 2x2 max pool, fc 64, fc 10; SGD lr 5e-2, batch 64, early stopping after 4 epochs without a lower val loss (report: 72.5%)."""
    return base_config(
        "tdt4265_cnn", tdt4265_cnn.__doc__,
        data=dict(name="cifar10", val_fraction=0.1, test_fraction=0.1),
        model=dict(name="tdt4265_cnn", activation="relu"), optimizer=dict(name="sgd", lr=5e-2),
        batch_size=64, epochs=10, best_metric="val_loss", patience=4, checkpoint_every=1)


def bs6207_allconv():
    """BS6207: all-conv net 16,16,pool,32,32,pool,64,64,pool,128,128,avgpool,dense 10; Adam 1e-3, batch 32, crop and flip, the best-val-accuracy state kept (report: 81.9%)."""
    return base_config(
        "bs6207_allconv", bs6207_allconv.__doc__,
        data=dict(name="cifar10", val_fraction=0.1, test_fraction=0.1),
        model=dict(name="bs6207_allconv", activation="relu"), optimizer=dict(name="adam", lr=1e-3),
        batch_size=32, epochs=20, augment=CROP_AND_FLIP, best_metric="val_accuracy", checkpoint_every=1)


EXPERIMENTS = {
    "tdt4265_cnn": tdt4265_cnn,
    "tdt4265_model1": lambda: variant(
        tdt4265_cnn(), "tdt4265_model1", "TDT4265 task 3, model 1: the task 2 net with batch norm after each conv "
        "and dropout 0.1 before each dense layer; SGD lr 5e-2 (report: 75.2%).", **{"model.name": "tdt4265_cnn_bn"}),
    "tdt4265_model2": lambda: variant(
        tdt4265_cnn(), "tdt4265_model2", "TDT4265 task 3, model 2: model 1 trained with Adam 1e-3 and crop/flip "
        "augmentation (report: 79.1%).", **{"model.name": "tdt4265_cnn_bn", "optimizer.name": "adam",
                                            "optimizer.lr": 1e-3,
                                            **{f"augment.{k}": v for k, v in CROP_AND_FLIP.items()}}),
    "bs6207_allconv": bs6207_allconv,
    "bs6207_allconv_bn": lambda: variant(
        bs6207_allconv(), "bs6207_allconv_bn", "BS6207: the all-conv net with batch norm after every conv "
        "(report: 82.4%).", **{"model.name": "bs6207_allconv_bn"}),
    "ai604_vgg19": lambda: variant(
        {**bs6207_allconv(), "model": {"name": "ai604_vgg19", "activation": "leaky_relu", "weight_init": "vgg"}},
        "ai604_vgg19", "AI604: VGG-19 from scratch, conv blocks 64-128-256-512-512 with LeakyReLU 0.2, head "
        "512-128-10 (on the 512 maps of the last block, 1x1 at 32x32), torchvision's VGG weight initialisation "
        "(from PyTorch's default it stays at chance); Adam 1e-4, batch 64, crop and flip; the best-val-accuracy "
        "state of 20 epochs kept (report: 69%).", **{"optimizer.lr": 1e-4, "batch_size": 64}),
}
