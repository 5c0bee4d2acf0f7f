"""What every RadBridge service shares and nothing else: layered settings and JSON logs.

It sits below ``dicom_node``, ``inference_service`` and the ``radbridge`` CLI so
that the services never import the CLI package (the layers stay one-way).
"""
