"""A real, small model: a handwritten-digit classifier (8x8 images, 10 classes).

Trained when the replica starts on the digits data set that scikit-learn ships, so nothing is
downloaded. `args.model` picks the estimator; `user_config.label` is a serve-only knob that
changes without restarting replicas, and `user_config.fail_share` (0 to 1) makes that share
of predictions answer 500: a bad release to show a canary being caught.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ray import serve
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from starlette.requests import Request
from starlette.responses import JSONResponse

MODELS = {
    "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
    "svc": lambda: make_pipeline(StandardScaler(), SVC(gamma="scale", C=10.0)),
}


@serve.deployment
class DigitsClassifier:
    def __init__(self, model: str) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        started = time.perf_counter()
        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
        self.model_name = model
        self.estimator = MODELS[model]().fit(x_train, y_train)
        self.accuracy = float(self.estimator.score(x_test, y_test))
        self.train_seconds = time.perf_counter() - started
        self.label = "default"
        self.fail_share = 0.0
        self.answered = 0
        # Which cluster answered: raygate sets RAYGATE_CLUSTER in every Ray process it starts
        # locally; KubeRay sets RAY_CLUSTER_NAME (the RayCluster's name) in every Ray container.
        self.cluster = os.environ.get("RAYGATE_CLUSTER") or os.environ.get("RAY_CLUSTER_NAME", "")

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.label = str(config.get("label", "default"))
        self.fail_share = min(1.0, max(0.0, float(config.get("fail_share", 0.0))))

    async def __call__(self, request: Request) -> Any:
        if request.method == "GET":
            return self._about()
        self.answered += 1
        # Deterministic: of every 100 predictions, the first fail_share*100 fail.
        if (self.answered % 100) < round(self.fail_share * 100):
            return JSONResponse({"error": "injected failure", **self._about()}, status_code=500)
        payload = await request.json()
        pixels = payload.get("pixels")
        if not isinstance(pixels, list) or len(pixels) != 64:
            return {"error": "send {'pixels': [64 numbers, 0-16]} for one 8x8 image"}
        prediction = int(self.estimator.predict([pixels])[0])
        return {"prediction": prediction, **self._about()}

    def _about(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "label": self.label,
            "test_accuracy": round(self.accuracy, 4),
            "cluster": self.cluster,
        }


def build(args: dict[str, Any]) -> Any:
    """Application builder: `import_path: digits:build` with `args: {model: logreg|svc}`."""
    return DigitsClassifier.bind(str(args.get("model", "logreg")))
