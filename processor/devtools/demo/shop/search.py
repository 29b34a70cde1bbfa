from processor.devtools.demo.shop import V2


def search(version, rng):
    took = rng.lognormvariate(3.4, 0.25)  # ~30 ms
    if version == V2 and rng.random() < 0.04:
        took *= 12  # 2.0.0 misses its cache on rare queries: only the tail is slower
    return took
