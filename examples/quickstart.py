"""Quick start: make a small CNN 90% block-sparse and train it for a few steps.

Runs on the CPU in seconds. The data is random (a fixed batch the model learns to fit); the
training CLI on real Fashion-MNIST comes with `python -m sparsekern.train`.
"""
import torch
import torch.nn as nn

import sparsekern as sk

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 10),
)
sk.sparsify(model, sparsity=0.9, block_size=32, distribution="erk")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

for step in range(30):
    loss = nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.4f}")

for name, layer in model.named_modules():
    if isinstance(layer, (sk.SparseLinear, sk.SparseConv2d)):
        print(f"layer {name}: {layer}")
