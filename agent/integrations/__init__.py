"""Callbacks that embed neurotop in the training frameworks people already use.

``neurotop.integrations.lightning.NeurotopCallback`` (PyTorch Lightning) and
``neurotop.integrations.transformers.NeurotopCallback`` (the Hugging Face ``Trainer``) watch
the framework's model and optimizers with ``neurotop.watch`` and map its loop onto the
monitor: the loss, the step boundary, ``stop``. Each module imports its framework; this
package imports neither, so ``import neurotop`` never pulls one in (install the extras
``neurotop[lightning]`` or ``neurotop[transformers]``).
"""
