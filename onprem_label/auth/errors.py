"""Domain errors of the auth package; the web layer maps them to HTTP answers in one place."""


class AuthError(Exception):
    """Base of auth errors; `code` is the stable machine-readable name."""

    code = "auth_error"


class PasswordPolicyError(AuthError):
    """A new password breaks the policy; the message says which rule."""

    code = "password_policy"


class InvalidUsername(AuthError):
    """A username is empty, too long or has characters we do not allow."""

    code = "invalid_username"


class UserExists(AuthError):
    """The username is taken."""

    code = "user_exists"


class UnknownUser(AuthError):
    """No such user (only for admin operations; login never says this)."""

    code = "unknown_user"


class InvalidRole(AuthError):
    """A role name outside the known set."""

    code = "invalid_role"


class WrongPassword(AuthError):
    """The current password given for a change is wrong."""

    code = "wrong_password"


class InvalidTotp(AuthError):
    """A TOTP or recovery code is wrong or already used."""

    code = "invalid_totp"
