"""MNIST experiments of two courses: 1MD120 (exercise 1: an FNN, a small CNN and its ablations) and
AI604 (problems 1-2: LeNet-5 with batch norm, an MLP and a strided conv net with batch norm).

An ablation is a sweep: the base config plus a list of variants, each a few dotted fields.
Variants that keep shapes (dropout rate, L1/L2 strength, learning rate) train side by side in one
program; the others (widths, depth, activation, optimizer) are separate programs of one command.
"""
from experiments.common import base_config, variant


def mnist_fnn():
    """Exercise 1.1: 784-800-10, ReLU, SGD lr 1, batch 1024, 30 epochs; the report reached 98%."""
    return base_config(
        "mnist_fnn", mnist_fnn.__doc__, model=dict(name="mlp", hidden=(800,), activation="relu"),
        optimizer=dict(name="sgd", lr=1.0), batch_size=1024, epochs=30)


def mnist_cnn():
    """Exercise 1.2: conv 8-16-32 3x3 pad 1 with ReLU, a 2x2 max pool after the first two, linear; SGD lr 0.1, batch 32, 20 epochs (report: 99%)."""
    return base_config(
        "mnist_cnn", mnist_cnn.__doc__,
        model=dict(name="small_cnn", features=(8, 16, 32), activation="relu", pool_first=False,
                   batch_norm=False, dropout=0.0),
        optimizer=dict(name="sgd", lr=0.1), batch_size=32, epochs=20)


def ablation(name, description, values=None, key=None, variants=None, base=None):
    """The CNN (or `base`) swept over `key` = each of `values`, or over explicit `variants`."""
    return variant(base or mnist_cnn(), name, description, sweep=tuple(variants or ({key: v} for v in values)))


def _doubling(first, blocks=3):
    return tuple(first * 2 ** i for i in range(blocks))


def lenet5_bn():
    """AI604 problem 2: LeNet-5 with batch norm after each conv (6 and 16 maps, 5x5), fc 120-84-10; Adam 1e-3, batch 64, 10 epochs."""
    return base_config(
        "lenet5_bn", lenet5_bn.__doc__, model=dict(name="lenet5_bn", activation="relu"),
        optimizer=dict(name="adam", lr=1e-3), batch_size=64, epochs=10)


EXPERIMENTS = {
    "mnist_fnn": mnist_fnn,
    "mnist_cnn": mnist_cnn,
    "mnist_cnn_pool_first": lambda: variant(mnist_cnn(), "mnist_cnn_pool_first",
                                            "Exercise 1.3: the CNN with max pooling before the ReLU.",
                                            **{"model.pool_first": True}),
    "mnist_cnn_tanh": lambda: variant(mnist_cnn(), "mnist_cnn_tanh", "Exercise 1.3: the CNN with tanh for ReLU.",
                                      **{"model.activation": "tanh"}),
    "mnist_cnn_adam": lambda: variant(mnist_cnn(), "mnist_cnn_adam", "Exercise 1.4: the CNN trained with Adam, lr 1e-3.",
                                      **{"optimizer.name": "adam", "optimizer.lr": 1e-3}),
    # Exercise 1.5: the report's variations of the CNN, one sweep each.
    "mnist_cnn_blocks": lambda: ablation(
        "mnist_cnn_blocks", "Exercise 1.5: 1 to 4 conv blocks (8, 16, 32, 64 maps).",
        [_doubling(8, blocks) for blocks in (1, 2, 3, 4)], "model.features"),
    "mnist_cnn_widths": lambda: ablation(
        "mnist_cnn_widths", "Exercise 1.5: 8, 16, 32 or 64 first-layer maps, doubling per block.",
        [_doubling(first) for first in (8, 16, 32, 64)], "model.features"),
    "mnist_cnn_activations": lambda: ablation(
        "mnist_cnn_activations", "Exercise 1.5: ReLU vs sigmoid vs tanh.", ("relu", "sigmoid", "tanh"),
        "model.activation"),
    "mnist_cnn_dropout": lambda: ablation(
        "mnist_cnn_dropout", "Exercise 1.5: dropout 0 to 0.6 after each pooling (one program).",
        (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6), "model.dropout"),
    "mnist_cnn_batchnorm": lambda: ablation(
        "mnist_cnn_batchnorm", "Exercise 1.5: without and with batch norm after each conv.", (False, True),
        "model.batch_norm"),
    "mnist_cnn_regularization": lambda: ablation(
        "mnist_cnn_regularization", "Exercise 1.5: SGD with an L1 penalty (1e-3, in the loss) or L2 (weight decay "
        "1e-3), against SGD and Adam (lr 1e-3) without.", variants=(
            {"label": "SGD"}, {"label": "SGD + L1 1e-3", "l1": 1e-3},
            {"label": "SGD + L2 1e-3", "optimizer.weight_decay": 1e-3},
            {"label": "Adam", "optimizer.name": "adam", "optimizer.lr": 1e-3})),
    "mnist_cnn_rotation": lambda: ablation(
        "mnist_cnn_rotation", "Exercise 1.5: random rotations of +-20 degrees (on the device, in the train step).",
        (0.0, 20.0), "augment.rotate"),
    "mnist_cnn_optimizers": lambda: ablation(
        "mnist_cnn_optimizers", "SGD (lr 0.1) vs Adam (1e-3) vs Rprop (1e-3) on the CNN.", variants=(
            {"label": "SGD 0.1"}, {"label": "Adam 1e-3", "optimizer.name": "adam", "optimizer.lr": 1e-3},
            {"label": "Rprop 1e-3", "optimizer.name": "rprop", "optimizer.lr": 1e-3})),
    "mnist_cnn_best": lambda: variant(
        mnist_cnn(), "mnist_cnn_best", "Exercise 1.5: the report's best model: 3 blocks of 32-64-128 maps, ReLU, "
        "batch norm, Adam 1e-3 (target >= 99.0%).",
        **{"model.features": (32, 64, 128), "model.batch_norm": True, "optimizer.name": "adam",
           "optimizer.lr": 1e-3, "epochs": 10}),
    # AI604 problems 1-2.
    "lenet5_bn": lenet5_bn,
    "lenet5_activations": lambda: ablation(
        "lenet5_activations", "AI604: LeNet-5 with batch norm, ReLU vs sigmoid.", ("relu", "sigmoid"),
        "model.activation", base=lenet5_bn()),
    "lenet5_fc_layers": lambda: ablation(
        "lenet5_fc_layers", "AI604: LeNet-5 with batch norm, 3 (120-84-10) vs 2 (120-10) fully connected layers.",
        variants=({"label": "3 fc", "model.name": "lenet5_bn"}, {"label": "2 fc", "model.name": "lenet5_bn_fc2"}),
        base=lenet5_bn()),
    "lenet5_optimizers": lambda: ablation(
        "lenet5_optimizers", "AI604: LeNet-5 with batch norm, Adam 1e-3 vs SGD (lr 0.01, momentum 0.9).",
        variants=({"label": "Adam"}, {"label": "SGD", "optimizer.name": "sgd", "optimizer.lr": 0.01,
                                      "optimizer.momentum": 0.9}), base=lenet5_bn()),
    "lenet5_batchnorm": lambda: ablation(
        "lenet5_batchnorm", "AI604: LeNet-5 with and without batch norm.",
        variants=({"label": "batch norm", "model.name": "lenet5_bn"}, {"label": "none", "model.name": "lenet5"}),
        base=lenet5_bn()),
    "ai604_mlp_bn": lambda: variant(lenet5_bn(), "ai604_mlp_bn", "AI604 problem 1: MLP 784-50-30-10 with batch norm; Adam.",
                                    **{"model.name": "ai604_mlp_bn"}),
    "ai604_cnn_bn": lambda: ablation(
        "ai604_cnn_bn", "AI604 problem 1: conv 8 6x6 stride 2, batch norm, ReLU, fc 10; without and with a 2x2 max pool.",
        ("ai604_cnn_bn", "ai604_cnn_bn_pool"), "model.name", base=lenet5_bn()),
}
