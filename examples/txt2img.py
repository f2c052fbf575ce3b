"""The classic A1111 API client script: POST /sdapi/v1/txt2img, save the images, print the seed.

    python examples/txt2img.py [http://127.0.0.1:7860]
"""

import base64
import io
import json
import sys

import requests
from PIL import Image

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7860"

payload = {
    "prompt": "a red circle on a blue background",
    "negative_prompt": "",
    "steps": 20,
    "width": 128,
    "height": 128,
    "sampler_index": "Euler a",
    "cfg_scale": 7,
    "batch_size": 1,
}

response = requests.post(url=f"{url}/sdapi/v1/txt2img", json=payload, timeout=600)
response.raise_for_status()
r = response.json()

for i, encoded in enumerate(r["images"]):
    image = Image.open(io.BytesIO(base64.b64decode(encoded.split(",", 1)[0])))
    image.save(f"output_{i}.png", pnginfo=None)
    print(f"saved output_{i}.png {image.size[0]}x{image.size[1]}")

info = json.loads(r["info"])
print("seed:", info["seed"])
print(info["infotexts"][0])
