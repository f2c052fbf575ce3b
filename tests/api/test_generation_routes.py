import json
import threading
import time

from PIL import Image
import base64
import io


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_returns_images_of_its_seeds_with_a1111_info(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 500, "batch_size": 2, "steps": 3,
                                               "width": 64, "height": 64, "sampler_index": "Euler a"})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [500, 501]
    assert len(body["images"]) == 2
    assert decode(body["images"][1]).getpixel((0, 0)) == (501 * 37 % 256, 501 * 91 % 256, 501 * 53 % 256)
    assert body["parameters"]["seed"] == 500
    assert info["sd_model_name"] == "alpha"
