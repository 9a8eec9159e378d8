"""Build sparsekern and its one native module, `sparsekern._C`.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build and a CUDA
toolkit is found (or SPARSEKERN_FORCE_CUDA=1); SPARSEKERN_NO_CUDA=1 forces a CPU-only build. A machine
without a GPU builds the CUDA kernels all the same: only the toolkit is needed. The Hopper GEMMs
(csrc/cuda/bsr_gemm_sm90.cu, on CUTLASS's CuTe) are added where CUTLASS's headers are found: those of the
`nvidia-cutlass` package (`pip install --no-deps nvidia-cutlass`; only its headers are used), or CUTLASS_INCLUDE.

Environment:
    TORCH_CUDA_ARCH_LIST   architectures to compile (default "8.0;9.0a")
    SPARSEKERN_FORCE_CUDA  1: build the CUDA kernels even where they would not be detected
    SPARSEKERN_NO_CUDA     1: build the CPU kernels only
    CUTLASS_INCLUDE        a CUTLASS include folder (holding cute/ and cutlass/), instead of nvidia-cutlass's
    MAX_JOBS               parallel compile jobs (ninja)

Install against the torch already in the environment:
    pip install --no-build-isolation --no-deps -e .
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _pin_cuda_home():
    """Point torch at a real toolkit before it looks for one.

    torch derives CUDA_HOME from the `nvcc` on PATH; a wrapper script such as /usr/local/bin/nvcc would
    make that /usr/local, which has no CUDA headers. Only fills in CUDA_HOME when the user did not set it.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


def _wheel_cuda_include():
    """Headers of the CUDA libraries (cuBLAS, cuSPARSE, ...) that ship in torch's nvidia-* wheels.

    ATen's CUDA headers include them, and a bare toolkit may not have them.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "cu13", "include")
        if os.path.isdir(path):
            found.append(path)
    return found


def _cutlass_include():
    # sparsekern/_build_paths.py by path: importing the package would need it built.
    spec = importlib.util.spec_from_file_location("_build_paths", os.path.join(ROOT, "sparsekern", "_build_paths.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cutlass_include()


def _sources(*patterns):
    # setuptools wants paths relative to setup.py
    files = []
    for pattern in patterns:
        files += sorted(glob.glob(os.path.join("csrc", pattern)))
    return files


def _c_string(value):
    # Emitted as -DNAME="value"; torch quotes each flag for the shell, so the quotes reach the compiler.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _extensions():
    _pin_cuda_home()
    import torch
    from torch.utils import cpp_extension

    force_cuda = _env_flag("SPARSEKERN_FORCE_CUDA")
    no_cuda = _env_flag("SPARSEKERN_NO_CUDA")
    with_cuda = not no_cuda and (
        force_cuda or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    )

    sources = _sources("*.cpp", "cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    extra_link_args = ["-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]

    if not with_cuda:
        print("sparsekern: building the CPU kernels only "
              f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"SPARSEKERN_NO_CUDA={int(no_cuda)})")
        return [
            cpp_extension.CppExtension(
                "sparsekern._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=extra_link_args,
            )
        ]

    # torch reads the arch list from the environment; without a GPU it cannot guess one.
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    print(f"sparsekern: building the CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={arch_list})")

    cutlass = _cutlass_include()
    print(f"sparsekern: Hopper GEMMs on CuTe: {'CUTLASS headers at ' + cutlass if cutlass else 'not built (no CUTLASS headers)'}")
    sources += [s for s in _sources("cuda/*.cu", "cuda/*.cpp") if cutlass or not s.endswith("_sm90.cu")]
    include_dirs += _wheel_cuda_include()
    define_macros += [
        ("SPARSEKERN_WITH_CUDA", "1"),
        ("SPARSEKERN_CUDA_ARCHS", _c_string(arch_list)),
    ]
    if cutlass:
        include_dirs.append(cutlass)
        define_macros.append(("SPARSEKERN_WITH_CUTE", "1"))
    return [
        cpp_extension.CUDAExtension(
            "sparsekern._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            # --resource-usage: ptxas prints registers, shared memory and spills of every kernel in the build log
            # (tests/test_cuda_static.py asserts no spills); -lineinfo: compute-sanitizer reports source lines.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--resource-usage", "-lineinfo"]},
            extra_link_args=extra_link_args,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="sparsekern",
    version="0.1.0",
    description="Block-sparse kernels for dynamic sparse training",
    # The Triton kernels live in their own top-level folder and install inside the package.
    packages=find_packages(include=["sparsekern", "sparsekern.*"]) + ["sparsekern.triton_kernels"],
    package_dir={"sparsekern.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    zip_safe=False,
)
