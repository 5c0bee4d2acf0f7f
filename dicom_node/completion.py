"""Study completion: a study is complete after a quiet window with no new instance.

There is no standard "study complete" signal in DICOM (Orthanc's StableAge and
dcmtk's --eostudy-timeout work the same way). A late instance reopens the
study, and its next completion re-routes it; results replace earlier ones.
"""

from __future__ import annotations

import logging

from dicom_node.index import Index
from dicom_node.spool import uid_key

logger = logging.getLogger(__name__)


def complete_quiet_studies(index: Index, quiet_window_s: float, now: float | None = None) -> list[str]:
    """Mark quiet studies COMPLETE and queue their route jobs; returns their UIDs."""
    done = []
    for study_uid in index.quiet_studies(quiet_window_s, now):
        if index.complete_study(study_uid, quiet_window_s, now):
            logger.info("study complete", extra={"event": "study.complete", "study_key": uid_key(study_uid)})
            done.append(study_uid)
    return done
