"""Transfer learning: ImageNet-pretrained ResNet-18 (TDT4265 task 4) and VGG-19 (AI604 problem 4) fine-tuned
on CIFAR-10. The 32x32 images stay 32x32 on the device; the model resizes them to 224 and applies
ImageNet's normalisation inside the jitted step. Weights: `--model.weights PATH` (a torchvision .pth,
or .npz/.safetensors), else torchvision's published file, downloaded into ~/.cache/flaxlab once.
"""
from experiments.common import base_config, variant


def tdt4265_resnet18():
    """TDT4265 task 4: ImageNet-pretrained ResNet-18, new 10-class head, CIFAR-10 resized to 224 with ImageNet normalisation; Adam 5e-4, batch 32, the best-val-accuracy state kept (report: 88.7%)."""
    return base_config(
        "tdt4265_resnet18", tdt4265_resnet18.__doc__,
        data=dict(name="cifar10", val_fraction=0.1, test_fraction=0.1),
        model=dict(name="resnet18", input_size=224, normalize=True, pretrained=True, weights=""),
        optimizer=dict(name="adam", lr=5e-4), batch_size=32, eval_batch_size=100, epochs=5,
        best_metric="val_accuracy", features=dict(layer="", image=0, last_conv=True))


def ai604_vgg19_pretrained():
    """AI604 problem 4: ImageNet-pretrained VGG-19 (torchvision's, new 10-class head) fine-tuned on CIFAR-10 at 224; Adam 1e-4, batch 64; row-normalised confusion matrices, first-layer filters, first and last conv maps."""
    return base_config(
        "ai604_vgg19_pretrained", ai604_vgg19_pretrained.__doc__,
        data=dict(name="cifar10", val_fraction=0.1, test_fraction=0.1),
        model=dict(name="vgg19", input_size=224, normalize=True, pretrained=True, weights="", dropout=0.5),
        optimizer=dict(name="adam", lr=1e-4), batch_size=64, eval_batch_size=100, epochs=5,
        best_metric="val_accuracy", features=dict(layer="", image=0, last_conv=True))


EXPERIMENTS = {
    "tdt4265_resnet18": tdt4265_resnet18,
    "ai604_vgg19_pretrained": ai604_vgg19_pretrained,
    "ai604_vgg19_scratch": lambda: variant(ai604_vgg19_pretrained(), "ai604_vgg19_scratch", "AI604 problem 4: the "
                                           "same VGG-19 trained from random weights, for comparison.",
                                           **{"model.pretrained": False}),
    "ai604_vgg19_transfer": lambda: variant(ai604_vgg19_pretrained(), "ai604_vgg19_transfer", "AI604 problem 4: "
                                            "VGG-19 pretrained vs from scratch, one launch.",
                                            sweep=({"label": "pretrained"},
                                                   {"label": "from scratch", "model.pretrained": False})),
}
