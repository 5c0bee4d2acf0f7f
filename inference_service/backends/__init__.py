"""Model backends behind one interface (see base.Backend)."""

#: backend kind -> "module:Class"; heavy backends import torch only when used.
BACKEND_TYPES: dict[str, str] = {
    "reference": "inference_service.backends.reference:ReferenceBackend",
    "medgemma": "inference_service.backends.medgemma:MedGemmaBackend",
    "paligemma": "inference_service.backends.paligemma:PaliGemmaBackend",
    "siglip": "inference_service.backends.siglip:SiglipBackend",
    "llava": "inference_service.backends.llava:LlavaBackend",
    "med3dvlm": "inference_service.backends.med3dvlm:Med3DVLMBackend",
    "m3d": "inference_service.backends.m3d:M3DBackend",
}
