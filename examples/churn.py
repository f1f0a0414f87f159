"""A churn model on pandas and scikit-learn, as a new user writes it on day one.

python examples/churn.py        (needs pandas and scikit-learn: pip install pandas scikit-learn)

- `n_folds` is used in Python (`range(n_folds)`): a structural parameter, so the graph has one
  `train_fold` step per fold; `seed` and `c` only reach steps: run parameters.
- `split` returns two DataFrames as named outputs; `score` returns a numpy float under
  `-> float`; `summary` returns a tuple: every one is stored exactly (docs/types.md).
- The fitted model is an arbitrary object: it opts in to pickle, which Plait labels unsafe.
- `report_failure` is an on_failure hook of the pipeline (docs/hooks.md).
- A second run with the same values comes from the cache; a different `c` retrains.
"""

from typing import Annotated, Any

import numpy as np
import pandas as pd

import plait


def report_failure(context: Any, error: BaseException) -> None:
    print(f"step {context.step_id} of run {context.run_id} failed: {error!r}")


@plait.step
def customers(n: int, seed: int) -> pd.DataFrame:
    """A synthetic customer table: tenure, monthly charges, support calls, and churn."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, n)
    charges = rng.normal(70, 20, n).round(2)
    calls = rng.poisson(2, n)
    risk = 0.04 * calls + 0.01 * (charges - 70) / 20 - 0.03 * tenure / 12
    churn = (risk + rng.normal(0, 0.1, n) > 0).astype(int)
    return pd.DataFrame(
        {"tenure": tenure, "charges": charges, "calls": calls, "churn": churn},
        index=pd.RangeIndex(n, name="customer"),
    )


@plait.step
def split(
    df: pd.DataFrame, fold: int, n_folds: int
) -> tuple[Annotated[pd.DataFrame, "train"], Annotated[pd.DataFrame, "test"]]:
    test = df.index % n_folds == fold
    return df[~test], df[test]


@plait.step(materializer="pickle")  # a fitted estimator: no exact format, so pickle, opted in
def train_fold(train: pd.DataFrame, c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=1000)
    return model.fit(train[["tenure", "charges", "calls"]], train["churn"])


@plait.step
def score(model: Any, test: pd.DataFrame) -> float:
    from sklearn.metrics import accuracy_score

    predicted = model.predict(test[["tenure", "charges", "calls"]])
    return accuracy_score(test["churn"], predicted)  # a numpy float, stored as a float


@plait.step
def summary(scores: list[float]) -> tuple[float, float]:
    return float(np.mean(scores)), float(np.std(scores))


@plait.pipeline(on_failure=report_failure)
def churn(n_folds: int = 3, seed: int = 7, c: float = 1.0) -> None:
    df = customers(600, seed)
    scores = []
    for fold in range(n_folds):  # n_folds has its value here: one branch per fold
        train, test = split(df, fold, n_folds)
        scores.append(score(train_fold(train, c), test))
    summary(scores)


if __name__ == "__main__":
    first = churn(n_folds=3, c=1)  # 1 for a float is 1.0: the same cache key as c=1.0
    first.raise_for_status()
    mean, std = first.steps["summary"].output()
    print(f"accuracy over 3 folds: {mean:.3f} ± {std:.3f}")
    assert 0.5 < mean <= 1.0 and isinstance(first.steps["score"].output(), float)
    train = first.steps["split"].output("train")
    assert isinstance(train, pd.DataFrame) and train.index.name == "customer"
    assert len([s for s in first.steps if s.startswith("train_fold")]) == 3

    again = churn(n_folds=3, c=1.0)  # same values: everything from the cache
    assert all(str(s.status) == "CACHED" for s in again.steps.values()), again.steps
    retrained = churn(n_folds=3, c=0.5)  # another c: the models retrain, the data is reused
    statuses = {name: str(s.status) for name, s in retrained.steps.items()}
    assert statuses["customers"] == "CACHED" and statuses["train_fold"] == "SUCCEEDED"
    print("rerun:", sorted(set(statuses.values())))
