"""The closed set of audit actions, as "object:action" strings."""

from enum import StrEnum


class AuditAction(StrEnum):
    """Every action the audit trail knows; new features add members here."""

    LOGIN_OK = "auth:login"
    LOGIN_FAILED = "auth:login_failed"
    LOGIN_LOCKED = "auth:locked"
    LOGIN_RATE_LIMITED = "auth:rate_limited"
    LOGOUT = "auth:logout"
    SESSION_TIMEOUT = "auth:session_timeout"
    BREAK_GLASS_LOGIN = "auth:break_glass_login"
    BREAK_GLASS_ISSUED = "auth:break_glass_issued"
    TOTP_FAILED = "auth:totp_failed"
    ACCESS_DENIED = "auth:access_denied"
    CSRF_REJECTED = "auth:csrf_rejected"

    USER_CREATE = "user:create"
    USER_DISABLE = "user:disable"
    USER_ENABLE = "user:enable"
    USER_UNLOCK = "user:unlock"
    USER_ROLES = "user:roles"
    USER_PASSWORD_CHANGE = "user:password_change"
    USER_PASSWORD_RESET = "user:password_reset"
    USER_SESSIONS_END = "user:sessions_end"
    USER_TOTP_START = "user:totp_start"
    USER_TOTP_ENABLE = "user:totp_enable"
    USER_TOTP_DISABLE = "user:totp_disable"

    TOKEN_CREATE = "token:create"
    TOKEN_REVOKE = "token:revoke"

    SYSTEM_INIT = "system:init"
    KEY_ROTATE = "key:rotate"
    STORAGE_REPAIR = "storage:repair"
    # Operations (issue 10): a snapshot taken, checked, or brought back into a new data directory.
    BACKUP_CREATE = "backup:create"
    BACKUP_VERIFY = "backup:verify"
    BACKUP_RESTORE = "backup:restore"

    PROJECT_CREATE = "project:create"
    PROJECT_UPDATE = "project:update"
    PROJECT_SCHEMA = "project:schema"
    PROJECT_MEMBER_ADD = "project:member_add"
    PROJECT_MEMBER_REMOVE = "project:member_remove"

    GOLD_MARK = "gold:mark"
    GOLD_UNMARK = "gold:unmark"
    GOLD_CHECK = "gold:check"
    QUALIFICATION_START = "qualification:start"
    QUALIFICATION_FINISH = "qualification:finish"
    QUALIFICATION_FRESH_START = "qualification:fresh_start"
    PEOPLE_PROPOSE = "people:propose"
    PEOPLE_DECIDE = "people:decide"
    PAY_ENTRY = "pay:entry"
    PAY_STATEMENT = "pay:statement"

    TASK_LEASE = "task:lease"
    TASK_RELEASE = "task:release"
    TASK_HEARTBEAT = "task:heartbeat"
    TASK_LEASE_EXPIRED = "task:lease_expired"
    TASK_SUBMIT = "task:submit"
    TASK_REVIEW = "task:review"
    TASK_REASSIGN = "task:reassign"
    TASK_VIEW = "task:view"
    TASK_SPOT_CHECK = "task:spot_check"
    ANNOTATION_SAVE = "annotation:save"
    ANNOTATION_IMPORT = "annotation:import"  # a model's predictions attached to a task as drafts

    ITEM_INGEST = "item:ingest"
    ITEM_DUPLICATE = "item:duplicate"
    ITEM_REJECT = "item:reject"
    ITEM_VIEW = "item:view"
    IMAGE_READ = "image:read"
    ITEM_PIXEL_CHECK_CLEAR = "item:pixel_check_clear"

    EXPORT_PROJECT = "export:project"
    IMPORT_PREDICTIONS = "import:predictions"  # one predictions file read, with its counts

    # The DICOM receiver (dicomnet): a calling node accepted or refused, and what one association brought.
    DICOM_ASSOCIATION_ACCEPT = "dicom:association_accept"
    DICOM_ASSOCIATION_REFUSE = "dicom:association_refuse"
    DICOM_ASSOCIATION_END = "dicom:association_end"

    AUDIT_SEARCH = "audit:search"
    AUDIT_EXPORT = "audit:export"
    AUDIT_VERIFY = "audit:verify"
    AUDIT_CHECKPOINT = "audit:checkpoint"
    AUDIT_ARCHIVE = "audit:archive"
