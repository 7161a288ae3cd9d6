"""MLflow models-from-code entry point for registered passray hypernets and structures.

``passray.registry`` logs this *file* as the model's code (``python_model=<this path>``);
MLflow copies it and records its name, so nothing is pickled. The weights travel as plain
artifacts and are loaded with passray's own validating loaders. The artifact's key says
what the model is:
- ``export`` (structure.json + weights.safetensors): ``predict`` maps normalised images
  ``[N, 3, H, W]`` to the pruned network's logits; its ``model.onnx`` (when the onnx
  package was installed at registration) is the same network for ONNX Runtime;
- ``hypernet`` (config.json + model.safetensors): ``predict`` returns the hypernet's spec
  (widths, sizes, prompt); use ``passray.registry.load_registered_hypernet`` to run it.

Importing this file must stay cheap (MLflow executes it while logging): torch and passray
are imported in ``load_context`` only.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class PassrayModel(PythonModel):
    """Loads a hypernet or a pruned network from the model's artifacts; no pickle."""

    def load_context(self, context) -> None:
        if "export" in context.artifacts:
            from passray.export import load_pruned

            self.net, self.spec = load_pruned(context.artifacts["export"])
        else:
            from passray.hypernet import load_hypernet

            self.net, self.spec = load_hypernet(context.artifacts["hypernet"])
        self.kind = "structure" if "export" in context.artifacts else "hypernet"

    def predict(self, context, model_input: np.ndarray, params=None):
        # np.ndarray: a hint MLflow accepts without deriving (and warning about) a schema
        if self.kind == "hypernet":
            return [self.spec]
        import torch

        with torch.no_grad():
            return self.net(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


mlflow.models.set_model(PassrayModel())
