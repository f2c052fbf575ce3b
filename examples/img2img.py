"""The classic A1111 img2img client script: send an init image, get a new one back.

    python examples/img2img.py input.png [http://127.0.0.1:7860]
"""

import base64
import io
import json
import sys

import requests
from PIL import Image

path = sys.argv[1]
url = sys.argv[2] if len(sys.argv) > 2 else "http://127.0.0.1:7860"

with open(path, "rb") as f:
    init = base64.b64encode(f.read()).decode()

payload = {
    "init_images": [init],
    "prompt": "a blue circle",
    "denoising_strength": 0.6,
    "steps": 20,
    "sampler_name": "DPM++ 2M Karras",
    "cfg_scale": 7,
}

r = requests.post(url=f"{url}/sdapi/v1/img2img", json=payload, timeout=600).json()
image = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
image.save("img2img_0.png")
print("saved img2img_0.png", image.size, "seed:", json.loads(r["info"])["seed"])
