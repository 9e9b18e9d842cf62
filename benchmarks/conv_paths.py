"""Each convolution and pooling layer of our models: XLA's kernel against the CPU rewrites.

  python -m benchmarks.conv_paths [--cpu_devices=1]

Forward plus gradients, batch 128, for the layer shapes of the MNIST CNN, LeNet-5 and ResNet-18
at 32x32: the input layers (marked *) need only the weight gradient, as in a model; the others
also the input gradient. 'NHWC rewrite' is the form the CPU rewrite takes for an NHWC layer
(dense, tiled or im2col; `dlassign.kernels.conv.conv_path`), used where a model runs NHWC on
a mesh of several devices; 'batch-minor' is the same layer on [C, H, W, N] arrays
(`dlassign.kernels.batch_minor`), which these models use on one CPU device. With
--cpu_devices above 1 the batch is sharded over the devices (NHWC only).
"""

from __future__ import annotations

import time

from benchmarks.common import parse, report, start_jax

CONVS = [  # (name, H, Cin, Cout, kernel, stride, padding); '*': the model's input layer
    ("cnn conv0*", 28, 1, 32, 3, 1, 0), ("cnn conv1", 13, 32, 64, 3, 1, 0),
    ("lenet conv1*", 32, 3, 6, 5, 1, 0), ("lenet conv2", 14, 6, 16, 5, 1, 0),
    ("resnet stem*", 32, 3, 64, 7, 2, 3), ("resnet layer1", 8, 64, 64, 3, 1, 1),
    ("resnet layer2 s2", 8, 64, 128, 3, 2, 1), ("resnet layer2", 4, 128, 128, 3, 1, 1),
    ("resnet downsample", 8, 64, 128, 1, 2, 0), ("resnet layer3 s2", 4, 128, 256, 3, 2, 1),
    ("resnet layer3", 2, 256, 256, 3, 1, 1), ("resnet layer4 s2", 2, 256, 512, 3, 2, 1),
    ("resnet layer4", 1, 512, 512, 3, 1, 1),
]
POOLS = [("cnn pool0", 26, 32, 2, 2, 0), ("cnn pool1", 11, 64, 2, 2, 0),
         ("lenet pool1", 28, 6, 2, 2, 0), ("resnet pool", 16, 64, 3, 2, 1)]


def main():
    args = parse(__doc__)
    jax = start_jax(args.cpu_devices or 1)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from dlassign.kernels import Layout, using
    from dlassign.kernels.batch_minor import batch_minor
    from dlassign.kernels.conv import conv_path
    from dlassign.models.layers import conv, max_pool

    mesh = Mesh(np.asarray(jax.devices()), ("d",))
    data, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    b = args.batch_size

    def best_ms(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.steps):
                out = fn(*a)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t) / args.steps)
        return 1e3 * min(times)

    rows = []
    for name, h, cin, cout, k, s, p in CONVS:
        x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (b, h, h, cin)), data)
        ms = {}
        for impl, bm in (("xla", False), ("im2col", False), ("cpu", True)):
            with using(Layout(impl, bm)):
                layer = conv(cout, k, s, p)
            xi = batch_minor(x) if bm else x
            v = jax.device_put(layer.init(jax.random.PRNGKey(1), xi[..., :1] if bm else xi[:1]),
                               rep)
            argnums = 0 if name.endswith("*") else (0, 1)
            grad = jax.jit(jax.grad(lambda v, x, layer=layer: jnp.sum(layer.apply(v, x) ** 2),
                                    argnums=argnums))
            ms["bm" if bm else impl] = best_ms(grad, v, xi)
        shapes = ((b, h, h, cin), (k, k, cin, cout), (s, s), ((p, p), (p, p)))
        rows.append({"layer": name, "shape": f"{h}x{h}x{cin}->{cout} k{k}/{s}",
                     "form": conv_path(*shapes, force=True), "xla": ms["xla"],
                     "fast": ms["im2col"], "ratio": ms["xla"] / ms["im2col"], "bm": ms["bm"],
                     "bm_ratio": ms["xla"] / ms["bm"]})
    for name, h, c, w, s, p in POOLS:
        x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (b, h, h, c)), data)
        ms = {}
        for impl, bm in (("xla", False), ("cpu", False), ("cpu", True)):
            def pooled(x, impl=impl):
                with using(Layout(impl)):
                    return max_pool(x, w, s, p)

            grad = jax.jit(jax.grad(lambda x, f=pooled: jnp.sum(f(x) ** 2)))
            ms["bm" if bm else impl] = best_ms(grad, batch_minor(x) if bm else x)
        rows.append({"layer": name, "shape": f"{h}x{h}x{c} max {w}/{s}", "xla": ms["xla"],
                     "form": "taps", "fast": ms["cpu"], "ratio": ms["xla"] / ms["cpu"],
                     "bm": ms["bm"], "bm_ratio": ms["xla"] / ms["bm"]})
    print(f"\nbatch {b}, forward + gradients, {jax.device_count()} CPU devices\n")
    report(rows, [("layer", "layer", "{}"), ("shape", "shape", "{}"),
                  ("XLA ms", "xla", "{:.2f}"), ("NHWC rewrite", "form", "{}"),
                  ("NHWC rewrite ms", "fast", "{:.2f}"), ("XLA / NHWC rewrite", "ratio", "{:.2f}x"),
                  ("batch-minor ms", "bm", "{:.2f}"), ("XLA / batch-minor", "bm_ratio", "{:.2f}x")],
           args.json)


if __name__ == "__main__":
    main()
