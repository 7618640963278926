package impuls.runtime;

/** A failure reported to the Runtime API as {errorType, errorMessage, stackTrace}. */
final class UserError extends Exception {
    private static final long serialVersionUID = 1L;
    final String type;

    UserError(String type, String message, Throwable cause) {
        super(message, cause);
        this.type = type;
    }

    /** The error named after the exception's class, as Lambda's Java runtime names it. */
    static UserError of(Throwable thrown) {
        String message = thrown.getMessage();
        return new UserError(thrown.getClass().getName(), message == null ? thrown.toString() : message, thrown);
    }
}
