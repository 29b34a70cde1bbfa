from processor.devtools.demo.shop import V1


def add_item(version, rng):
    return rng.lognormvariate(2.5, 0.3)  # ~12 ms, the same in every version


def apply_discount(version, rng):
    # 2.0.0 evaluates every promotion rule for every item: twice as slow at the median
    median_log = 3.0 if version == V1 else 3.7  # ~20 ms, then ~40 ms
    return rng.lognormvariate(median_log, 0.3)
