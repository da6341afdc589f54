"""The baseline: what a user would write instead of mutask, in BentoML's examples style.

One plain ONNX Runtime session per task graph of an exported artifact (``ART/task.<task>.onnx``,
ONNX Runtime's defaults on CPU), the preprocessing the manifest records, and one API:
``POST /predict`` (multipart: ``task``, ``image``) answering the arg-max label and index.

    MUTASK_ARTIFACT=ART bentoml serve mutask.benchmarks.minimal_service:Minimal
"""

import os

import bentoml
import onnxruntime as ort
from PIL.Image import Image

from mutask.export.artifact import load_artifact


@bentoml.service
class Minimal:
    def __init__(self) -> None:
        art = load_artifact(os.environ["MUTASK_ARTIFACT"])
        self.tasks = art.tasks
        self.sessions = {
            task: ort.InferenceSession(str(art.graph_path(task)), providers=["CPUExecutionProvider"])
            for task in art.tasks
        }

    @bentoml.api
    def predict(self, task: str, image: Image) -> dict:
        if task not in self.sessions:
            raise bentoml.exceptions.NotFound(f"unknown task {task!r}; valid tasks: {', '.join(self.sessions)}")
        x = self.tasks[task].preprocessing.image(image)
        logits = self.sessions[task].run(None, {"image": x})[0][0]
        index = int(logits.argmax())
        return {"task": task, "label": self.tasks[task].labels[index], "index": index}
