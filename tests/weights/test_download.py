"""`python -m fcn_unet_jax.weights.download`: fetch, hash check, convert; never the internet.

Every download here comes from an `http.server` on 127.0.0.1 serving files the test writes,
named the way the publishers name theirs (torchvision's SHA-256 prefix in the file name).
"""

import functools
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
from absl import flags

from fcn_unet_jax import errors
from fcn_unet_jax.weights import download
from tests.weights.common import torchvision_vgg16_features


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # Keep the test output quiet.
        pass


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """(served folder, base URL, list of requested paths) of a local HTTP server."""
    root = tmp_path_factory.mktemp('served')
    requests = []

    class Handler(_Handler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{httpd.server_address[1]}/', requests
    httpd.shutdown()
    thread.join()


def _serve(root, stem: str, suffix: str, content: bytes) -> str:
    """Writes `content` as torchvision names files: STEM-<sha256 prefix>SUFFIX; returns it."""
    name = f'{stem}-{hashlib.sha256(content).hexdigest()[:8]}{suffix}'
    (root / name).write_bytes(content)
    return name


def test_download_checks_the_name_hash_and_reuses_a_checked_file(server, tmp_path):
    root, base, requests = server
    content = os.urandom(3000)
    name = _serve(root, 'small', '.pth', content)
    original = download.Original(base + name, 'unet_vgg16')
    assert original.sha256_prefix == hashlib.sha256(content).hexdigest()[:8]

    path = download.download(original, str(tmp_path / 'dl'))
    assert path == str(tmp_path / 'dl' / name)
    with open(path, 'rb') as f:
        assert f.read() == content
    assert os.listdir(tmp_path / 'dl') == [name]  # No temporary file left.
    before = len(requests)
    assert download.download(original, str(tmp_path / 'dl')) == path
    assert len(requests) == before  # Reused, not fetched again.


def test_hash_mismatch_is_one_error_line_and_leaves_no_file(server, tmp_path, capsys):
    root, base, _ = server
    (root / 'weights-deadbeef.pth').write_bytes(b'not the published file')
    original = download.Original(base + 'weights-deadbeef.pth', 'unet_vgg16')
    with pytest.raises(download.HashMismatchError, match='published one starts with deadbeef'):
        download.download(original, str(tmp_path / 'dl'))
    assert os.listdir(tmp_path / 'dl') == []

    md5 = download.Original(base + 'weights-deadbeef.pth', 'unet_vgg16', md5='0' * 32)
    assert 'MD5' in download.hash_problem(md5, {'sha256': 'deadbeef', 'md5': '1' * 32})
    assert download.hash_problem(md5, {'sha256': 'deadbeef00', 'md5': '0' * 32}) is None

    # Through the program: `--url` points a known name at the bad file.
    fv = flags.FlagValues()
    download.define_flags(fv)
    errors.define_traceback_flag(fv)
    fv(['download', f'--dir={tmp_path / "w"}', f'--url={base}weights-deadbeef.pth'])
    with pytest.raises(SystemExit) as exit_info:
        errors.guard(download.main, flag_values=fv)(['download', 'vgg16_fcn'], fv)
    assert exit_info.value.code == errors.EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith('error: ') and 'vgg16-397923af.pth' in lines[0]
    assert lines[1].startswith('hint: ') and len(lines) == 2
    assert os.listdir(tmp_path / 'w' / 'downloads') == []
    assert sorted(os.listdir(tmp_path / 'w')) == ['downloads']  # No NAME folder either.


def test_unreachable_url_and_unknown_name_are_user_errors(tmp_path):
    original = download.Original('http://127.0.0.1:9/x-00000000.pth', 'unet_vgg16')
    with pytest.raises(errors.UserError, match='Cannot download http://127.0.0.1:9/'):
        download.download(original, str(tmp_path))
    assert os.listdir(tmp_path) == []
    fv = flags.FlagValues()
    download.define_flags(fv)
    fv(['download'])
    with pytest.raises(errors.UserError, match="Unknown weights name 'vgg17'"):
        download.main(['download', 'vgg17'], fv)
    (tmp_path / 'unet_vgg16_imagenet').mkdir()
    with pytest.raises(errors.UserError, match='exists and is not a converted checkpoint'):
        download.fetch_and_convert(
            'unet_vgg16_imagenet', original, str(tmp_path), url='http://127.0.0.1:9/'
        )


def test_registry_names_official_files_with_published_hashes():
    for name, original in download.ORIGINALS.items():
        assert original.url.startswith(
            ('https://download.pytorch.org/models/', 'https://storage.googleapis.com/')
        ), name
        # Every file carries a published check: torchvision's name prefix or Keras' MD5.
        assert original.sha256_prefix or (original.md5 and len(original.md5) == 32), name
    assert download.ORIGINALS['fcn_resnet50_imagenet'].sha256_prefix == '0676ba61'
    assert 'unet_vgg16_imagenet' in download.listing()


def test_fetch_and_convert_writes_a_checkpoint_init_from_reads(server, tmp_path):
    from fcn_unet_jax import weights

    root, base, _ = server
    source = tmp_path / 'vgg16.npz'
    state = torchvision_vgg16_features()
    np.savez(source, **state)
    name = _serve(root, 'vgg16features', '.npz', source.read_bytes())
    original = download.Original(base + name, 'unet_vgg16')

    output = download.fetch_and_convert('unet_vgg16_imagenet', original, str(tmp_path / 'w'))
    assert output == str(tmp_path / 'w' / 'unet_vgg16_imagenet')
    plain = tmp_path / 'plain'
    plain.mkdir()  # Readable as any folder the user makes (not a temporary folder's 0700).
    assert os.stat(output).st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert sorted(os.listdir(tmp_path / 'w')) == ['downloads', 'unet_vgg16_imagenet']
    restored = weights.load_pretrained(output, model_name='unet_vgg16')
    kernel = restored['params']['backbone']['conv1_1']['kernel']
    np.testing.assert_array_equal(kernel, state['features.0.weight'].transpose(2, 3, 1, 0))
    # A second run finds the checkpoint and does nothing.
    assert download.fetch_and_convert('unet_vgg16_imagenet', original, str(tmp_path / 'w'))
