from processor.devtools.demo.shop import V1


class CardDeclined(Exception):
    pass


class GatewayTimeout(Exception):
    pass


def charge(version, rng):
    if version == V1:
        if rng.random() < 0.01:
            raise CardDeclined("card declined")
    elif rng.random() < 0.2:  # 2.0.0 talks to a new payment gateway that times out
        raise GatewayTimeout("payment gateway did not answer in time")
    return rng.lognormvariate(4.4, 0.25)  # ~80 ms


def legacy_fraud_check(version, rng):
    return rng.lognormvariate(2.0, 0.3)  # 1.0.0 calls it; 2.0.0 no longer does


def fraud_score(version, rng):
    return rng.lognormvariate(2.3, 0.3)  # new in 2.0.0, instead of legacy_fraud_check
