/*
 * _fastdecode: OTLP ExportTraceServiceRequest bytes -> the columns of a Backflow Batch.
 *
 * The compiled twin of processor/receiver/decode.py (decode_message), which stays the
 * reference: the same attributes read, the same fallbacks, the same checks in the same
 * order with the same reasons. tests/test_fastdecode.py holds the two to the same output.
 *
 * One walk over the bytes both checks them and reads them. It accepts exactly what
 * protobuf's upb parser (python protobuf >= 4, ParseFromString) accepts for this schema:
 * wire-format errors; invalid UTF-8 in any known proto3 string field, read or not; known
 * fields with another wire type (unknown fields for upb, not errors); unknown fields and
 * groups; upb's nesting limit of 100 sub-messages and groups below the request; repeated
 * occurrences of singular fields (the last wins, sub-messages merge). Parts of the message
 * that Backflow does not read (links, events of refused spans, other attributes' values)
 * are checked by validate(), driven by the schema below. The only reads ahead of the walk
 * are for fields that may come after what needs them: the resource of a ResourceSpans is
 * read before its scopes, and the scope name of a ScopeSpans when a span-name location
 * first needs it.
 *
 * decode(data, max_end_ns=2**62-1, max_attribute_length=0) returns
 *   (n, loc, ver, start, end, error, trace_id, span_id, parent_id, kind, locations, versions,
 *    exceptions, reasons)
 * with the columns as bytearrays (int32, int32, int64, int64, uint8 0/1, 16-byte ids,
 * 8-byte span ids, 8-byte parent span ids (zeros for a root, or a parent id that is not 8
 * bytes), uint8 span kind (0 for one outside 0-5), in native byte order), locations as (environment, service, function, file, line, scope)
 * tuples, versions as (service, service.version, vcs.ref.head.revision) tuples,
 * exceptions as (row, type) tuples and reasons as (reason number, count) pairs in the
 * order first seen (spans ending after max_end_ns, or keeping a value longer than
 * max_attribute_length characters, are refused as decode.decode_message refuses them);
 * or None when an attribute that is read holds a bytes, array or kvlist
 * value, whose str() this code does not reproduce: the caller decodes that request in
 * Python. Raises ValueError when ParseFromString would raise DecodeError.
 *
 * count_spans(data): the spans of a request that parses, else ValueError.
 * schema(): the schema compiled in here, which decode.py compares with the descriptors of
 * the installed opentelemetry-proto before using this module.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------------------ */
/* Schema                                                                                */

/* google.protobuf.FieldDescriptor.TYPE_* */
enum {
    T_DOUBLE = 1, T_FLOAT = 2, T_INT64 = 3, T_UINT64 = 4, T_INT32 = 5, T_FIXED64 = 6,
    T_FIXED32 = 7, T_BOOL = 8, T_STRING = 9, T_GROUP = 10, T_MESSAGE = 11, T_BYTES = 12,
    T_UINT32 = 13, T_ENUM = 14, T_SFIXED32 = 15, T_SFIXED64 = 16, T_SINT32 = 17, T_SINT64 = 18,
};

enum {
    M_REQUEST, M_RESOURCE_SPANS, M_RESOURCE, M_KEY_VALUE, M_ANY_VALUE, M_ARRAY_VALUE,
    M_KEY_VALUE_LIST, M_ENTITY_REF, M_SCOPE_SPANS, M_SCOPE, M_SPAN, M_EVENT, M_LINK, M_STATUS,
    M_COUNT
};

typedef struct { uint32_t number; uint8_t type; uint8_t repeated; int8_t sub; } fdef_t;
typedef struct { const char *name; const fdef_t *fields; int count; } mdef_t;

#define R 1
static const fdef_t F_REQUEST[] = {{1, T_MESSAGE, R, M_RESOURCE_SPANS}};
static const fdef_t F_RESOURCE_SPANS[] = {
    {1, T_MESSAGE, 0, M_RESOURCE}, {2, T_MESSAGE, R, M_SCOPE_SPANS}, {3, T_STRING, 0, -1}};
static const fdef_t F_RESOURCE[] = {
    {1, T_MESSAGE, R, M_KEY_VALUE}, {2, T_UINT32, 0, -1}, {3, T_MESSAGE, R, M_ENTITY_REF}};
static const fdef_t F_KEY_VALUE[] = {
    {1, T_STRING, 0, -1}, {2, T_MESSAGE, 0, M_ANY_VALUE}, {3, T_INT32, 0, -1}};
static const fdef_t F_ANY_VALUE[] = {
    {1, T_STRING, 0, -1}, {2, T_BOOL, 0, -1}, {3, T_INT64, 0, -1}, {4, T_DOUBLE, 0, -1},
    {5, T_MESSAGE, 0, M_ARRAY_VALUE}, {6, T_MESSAGE, 0, M_KEY_VALUE_LIST}, {7, T_BYTES, 0, -1},
    {8, T_INT32, 0, -1}};
static const fdef_t F_ARRAY_VALUE[] = {{1, T_MESSAGE, R, M_ANY_VALUE}};
static const fdef_t F_KEY_VALUE_LIST[] = {{1, T_MESSAGE, R, M_KEY_VALUE}};
static const fdef_t F_ENTITY_REF[] = {
    {1, T_STRING, 0, -1}, {2, T_STRING, 0, -1}, {3, T_STRING, R, -1}, {4, T_STRING, R, -1}};
static const fdef_t F_SCOPE_SPANS[] = {
    {1, T_MESSAGE, 0, M_SCOPE}, {2, T_MESSAGE, R, M_SPAN}, {3, T_STRING, 0, -1}};
static const fdef_t F_SCOPE[] = {
    {1, T_STRING, 0, -1}, {2, T_STRING, 0, -1}, {3, T_MESSAGE, R, M_KEY_VALUE},
    {4, T_UINT32, 0, -1}};
static const fdef_t F_SPAN[] = {
    {1, T_BYTES, 0, -1}, {2, T_BYTES, 0, -1}, {3, T_STRING, 0, -1}, {4, T_BYTES, 0, -1},
    {16, T_FIXED32, 0, -1}, {5, T_STRING, 0, -1}, {6, T_ENUM, 0, -1}, {7, T_FIXED64, 0, -1},
    {8, T_FIXED64, 0, -1}, {9, T_MESSAGE, R, M_KEY_VALUE}, {10, T_UINT32, 0, -1},
    {11, T_MESSAGE, R, M_EVENT}, {12, T_UINT32, 0, -1}, {13, T_MESSAGE, R, M_LINK},
    {14, T_UINT32, 0, -1}, {15, T_MESSAGE, 0, M_STATUS}};
static const fdef_t F_EVENT[] = {
    {1, T_FIXED64, 0, -1}, {2, T_STRING, 0, -1}, {3, T_MESSAGE, R, M_KEY_VALUE},
    {4, T_UINT32, 0, -1}};
static const fdef_t F_LINK[] = {
    {1, T_BYTES, 0, -1}, {2, T_BYTES, 0, -1}, {3, T_STRING, 0, -1},
    {4, T_MESSAGE, R, M_KEY_VALUE}, {5, T_UINT32, 0, -1}, {6, T_FIXED32, 0, -1}};
static const fdef_t F_STATUS[] = {{2, T_STRING, 0, -1}, {3, T_ENUM, 0, -1}};
#undef R

#define MDEF(name, f) {name, f, (int)(sizeof(f) / sizeof(f[0]))}
static const mdef_t MESSAGES[M_COUNT] = {
    MDEF("opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest", F_REQUEST),
    MDEF("opentelemetry.proto.trace.v1.ResourceSpans", F_RESOURCE_SPANS),
    MDEF("opentelemetry.proto.resource.v1.Resource", F_RESOURCE),
    MDEF("opentelemetry.proto.common.v1.KeyValue", F_KEY_VALUE),
    MDEF("opentelemetry.proto.common.v1.AnyValue", F_ANY_VALUE),
    MDEF("opentelemetry.proto.common.v1.ArrayValue", F_ARRAY_VALUE),
    MDEF("opentelemetry.proto.common.v1.KeyValueList", F_KEY_VALUE_LIST),
    MDEF("opentelemetry.proto.common.v1.EntityRef", F_ENTITY_REF),
    MDEF("opentelemetry.proto.trace.v1.ScopeSpans", F_SCOPE_SPANS),
    MDEF("opentelemetry.proto.common.v1.InstrumentationScope", F_SCOPE),
    MDEF("opentelemetry.proto.trace.v1.Span", F_SPAN),
    MDEF("opentelemetry.proto.trace.v1.Span.Event", F_EVENT),
    MDEF("opentelemetry.proto.trace.v1.Span.Link", F_LINK),
    MDEF("opentelemetry.proto.trace.v1.Status", F_STATUS),
};

/* Dense lookup built at import: field number -> (kind, wire type, sub-message). */
#define MAX_FIELD 16
enum { K_NONE = 0, K_VARINT, K_FIXED64, K_FIXED32, K_BYTES, K_STRING, K_MESSAGE };
typedef struct { uint8_t kind; uint8_t wt; int8_t sub; } slot_t;
static slot_t LOOKUP[M_COUNT][MAX_FIELD + 1];

static int build_lookup(void) {
    for (int m = 0; m < M_COUNT; m++) {
        for (int i = 0; i < MESSAGES[m].count; i++) {
            const fdef_t *f = &MESSAGES[m].fields[i];
            slot_t s = {K_NONE, 0, f->sub};
            switch (f->type) {
            case T_INT64: case T_UINT64: case T_INT32: case T_BOOL: case T_UINT32:
            case T_ENUM: case T_SINT32: case T_SINT64:
                s.kind = K_VARINT; s.wt = 0; break;
            case T_DOUBLE: case T_FIXED64: case T_SFIXED64:
                s.kind = K_FIXED64; s.wt = 1; break;
            case T_FLOAT: case T_FIXED32: case T_SFIXED32:
                s.kind = K_FIXED32; s.wt = 5; break;
            case T_STRING: s.kind = K_STRING; s.wt = 2; break;
            case T_BYTES: s.kind = K_BYTES; s.wt = 2; break;
            case T_MESSAGE: s.kind = K_MESSAGE; s.wt = 2; break;
            default: return -1;
            }
            /* Repeated numeric fields would need packed decoding, which is not written. */
            if (f->number > MAX_FIELD || (f->repeated && s.wt != 2)) return -1;
            LOOKUP[m][f->number] = s;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Wire format                                                                           */

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE static inline
#endif

/* Status of a walk: the first three are what ParseFromString would refuse. */
enum { ST_OK = 0, ST_CORRUPT, ST_UTF8, ST_DEPTH, ST_PYTHON /* Python error set */,
       ST_FALLBACK /* leave the request to the Python decoder */ };

/* upb's limit: sub-messages and groups nested below the top-level message. */
#define MAX_DEPTH 100

typedef struct { const uint8_t *p, *end; } cur_t;

/* A value varint: at most 10 bytes; bits beyond 64 are dropped (as upb does). */
ALWAYS_INLINE int rd_varint(cur_t *c, uint64_t *out) {
    const uint8_t *p = c->p;
    if (p < c->end && *p < 0x80) { *out = *p; c->p = p + 1; return 1; }
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= c->end) return 0;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) { *out = v; c->p = p; return 1; }
    }
    return 0;
}

/* A tag: at most 5 bytes, below 2**32, wire type not 6 or 7, field number not 0 unless
 * zero_ok: inside a group, where upb does not check it (found by fuzz/decode_fuzz.py). */
ALWAYS_INLINE int rd_tag_or_zero(cur_t *c, uint32_t *field, int *wt, int zero_ok) {
    const uint8_t *p = c->p;
    if (p < c->end && *p < 0x80) { /* one byte: fields 1 to 15 */
        uint8_t b = *p;
        if (((b >> 3) == 0 && !zero_ok) || (b & 7) >= 6) return 0;
        *field = b >> 3;
        *wt = b & 7;
        c->p = p + 1;
        return 1;
    }
    uint64_t v = 0;
    for (int i = 0; i < 5; i++) {
        if (p >= c->end) return 0;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (v > 0xffffffffu || ((v >> 3) == 0 && !zero_ok) || (v & 7) >= 6) return 0;
            *field = (uint32_t)(v >> 3);
            *wt = (int)(v & 7);
            c->p = p;
            return 1;
        }
    }
    return 0;
}

#define rd_tag(c, field, wt) rd_tag_or_zero(c, field, wt, 0)

/* A length: at most 5 bytes, and no longer than what is left. */
ALWAYS_INLINE int rd_len(cur_t *c, const uint8_t **s, Py_ssize_t *n) {
    const uint8_t *p = c->p;
    if (p < c->end && *p < 0x80) {
        Py_ssize_t v = *p++;
        if (v > c->end - p) return 0;
        *s = p;
        *n = v;
        c->p = p + v;
        return 1;
    }
    uint64_t v = 0;
    for (int i = 0; i < 5; i++) {
        if (p >= c->end) return 0;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (v > (uint64_t)(c->end - p)) return 0;
            *s = p;
            *n = (Py_ssize_t)v;
            c->p = p + v;
            return 1;
        }
    }
    return 0;
}

static inline uint64_t le64(const uint8_t *p) {
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Skips a group opened by field `number` (an unknown field for upb); `depth`: the nesting
 * budget of the message it is in, of which the group takes one level. */
static int skip_group(cur_t *c, uint32_t number, int depth) {
    if (depth <= 0) return 0;
    for (;;) {
        uint32_t f; int wt; uint64_t u; const uint8_t *s; Py_ssize_t n;
        if (!rd_tag_or_zero(c, &f, &wt, 1)) return 0;
        switch (wt) {
        case 0: if (!rd_varint(c, &u)) return 0; break;
        case 1: if (c->end - c->p < 8) return 0; c->p += 8; break;
        case 2: if (!rd_len(c, &s, &n)) return 0; break;
        case 3: if (!skip_group(c, f, depth - 1)) return 0; break;
        case 4: return f == number;
        case 5: if (c->end - c->p < 4) return 0; c->p += 4; break;
        default: return 0;
        }
    }
}

/* Most strings are ASCII: whole words first (the last one may overlap), then the rules. */
static int utf8_valid_slow(const uint8_t *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        if (c < 0xC2) return 0;
        if (c < 0xE0) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
        } else if (c < 0xF0) {
            if (n - i < 3) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c2 & 0xC0) != 0x80) return 0;
            if (c == 0xE0) { if (c1 < 0xA0 || c1 > 0xBF) return 0; }      /* overlong */
            else if (c == 0xED) { if (c1 < 0x80 || c1 > 0x9F) return 0; } /* surrogates */
            else if ((c1 & 0xC0) != 0x80) return 0;
            i += 3;
        } else if (c < 0xF5) {
            if (n - i < 4) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
            if (c == 0xF0) { if (c1 < 0x90 || c1 > 0xBF) return 0; }      /* overlong */
            else if (c == 0xF4) { if (c1 < 0x80 || c1 > 0x8F) return 0; } /* > U+10FFFF */
            else if ((c1 & 0xC0) != 0x80) return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

ALWAYS_INLINE int utf8_valid(const uint8_t *s, Py_ssize_t n) {
    uint64_t acc = 0, w;
    if (n >= 8) {
        for (Py_ssize_t i = 0; i + 8 <= n; i += 8) { memcpy(&w, s + i, 8); acc |= w; }
        memcpy(&w, s + n - 8, 8);
        acc |= w;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) acc |= s[i];
    }
    return (acc & 0x8080808080808080ULL) == 0 || utf8_valid_slow(s, n);
}

/* One field: tag, then the payload (varint and fixed values in u, bytes in s and n);
 * sub is the message type of a known sub-message field (wire type 2), else -1. */
typedef struct { uint32_t field; int wt; uint64_t u; const uint8_t *s; Py_ssize_t n; int sub; } fld_t;

/* Reads one field of a message of type `msg` with nesting budget `depth` and checks it as
 * upb does: wire format, UTF-8 of known string fields, unknown groups. The content of a
 * known sub-message is left to the caller (f->sub >= 0): it reads it with a function that
 * checks as it goes, or checks it with validate(). */
ALWAYS_INLINE int vfield(cur_t *c, int msg, int depth, fld_t *f) {
    if (!rd_tag(c, &f->field, &f->wt)) return ST_CORRUPT;
    f->sub = -1;
    switch (f->wt) {
    case 0: return rd_varint(c, &f->u) ? ST_OK : ST_CORRUPT;
    case 1: if (c->end - c->p < 8) return ST_CORRUPT; f->u = le64(c->p); c->p += 8; return ST_OK;
    case 5: if (c->end - c->p < 4) return ST_CORRUPT; f->u = le32(c->p); c->p += 4; return ST_OK;
    case 2:
        if (!rd_len(c, &f->s, &f->n)) return ST_CORRUPT;
        if (f->field <= MAX_FIELD) { /* a known field with another wire type is unknown */
            const slot_t *sl = &LOOKUP[msg][f->field];
            if (sl->kind == K_STRING) {
                if (!utf8_valid(f->s, f->n)) return ST_UTF8;
            } else if (sl->kind == K_MESSAGE) {
                if (depth <= 0) return ST_DEPTH;
                f->sub = sl->sub;
            }
        }
        return ST_OK;
    case 3: return skip_group(c, f->field, depth) ? ST_OK : ST_CORRUPT;
    default: return ST_CORRUPT; /* 4: an end-group outside a group */
    }
}

/* A message of type `msg` with nesting budget `depth`, checked whole. */
static int validate(const uint8_t *p, const uint8_t *end, int msg, int depth, Py_ssize_t *spans) {
    cur_t c = {p, end};
    fld_t f = {0};
    int st;
    while (c.p < c.end) {
        if ((st = vfield(&c, msg, depth, &f))) return st;
        if (f.sub >= 0) {
            if ((st = validate(f.s, f.s + f.n, f.sub, depth - 1, spans))) return st;
            *spans += f.sub == M_SPAN;
        }
    }
    return ST_OK;
}

static Py_ssize_t unused_count;

/* The sub-message in f, which the caller does not read: checked only. */
#define CHECK_SUB(f, depth) ((f).sub >= 0 ? validate((f).s, (f).s + (f).n, (f).sub, (depth) - 1, &unused_count) : ST_OK)

/* Re-reading a message already checked: one field, its payload, nothing else checked. */
ALWAYS_INLINE int next_field(cur_t *c, fld_t *f) {
    if (!rd_tag(c, &f->field, &f->wt)) return 0;
    switch (f->wt) {
    case 0: return rd_varint(c, &f->u);
    case 1: if (c->end - c->p < 8) return 0; f->u = le64(c->p); c->p += 8; return 1;
    case 2: return rd_len(c, &f->s, &f->n);
    case 3: return skip_group(c, f->field, MAX_DEPTH);
    case 5: if (c->end - c->p < 4) return 0; f->u = le32(c->p); c->p += 4; return 1;
    default: return 0;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Attribute values, rendered like Python's str() of protobuf's scalars                 */

enum { A_FUNCTION_NAME, A_NAMESPACE, A_FUNCTION, A_FILE_PATH, A_FILEPATH, A_LINE_NUMBER,
       A_LINENO, /* code.* */
       /* a span's operation without code attributes (location.operation_of), and its HTTP status */
       A_HTTP_METHOD, A_HTTP_METHOD_OLD, A_HTTP_ROUTE, A_URL_TEMPLATE, A_SERVER_ADDRESS,
       A_NET_PEER_NAME, A_RPC_SYSTEM, A_RPC_SERVICE, A_RPC_METHOD, A_DB_SYSTEM, A_DB_SYSTEM_OLD,
       A_DB_SUMMARY, A_DB_TEXT, A_DB_TEXT_OLD, A_DB_OPERATION, A_DB_OPERATION_OLD, A_DB_COLLECTION, A_MSG_OPERATION,
       A_MSG_DESTINATION, A_HTTP_STATUS, A_HTTP_STATUS_OLD,
       A_SPAN_COUNT, /* the span attributes read */
       A_SERVICE_NAME = A_SPAN_COUNT, A_SERVICE_VERSION, A_REVISION, A_ENV_NAME, A_ENV,
       A_COUNT /* the resource attributes read */ };

enum { VK_NONE = 0, VK_STR, VK_INT, VK_BOOL, VK_DOUBLE, VK_UNSUPPORTED /* bytes, array, kvlist */ };

typedef struct { int kind; const uint8_t *s; Py_ssize_t n; int64_t i; double d; } val_t;

/* In slot order; exported, so that decode.py can compare them with processor.location's. */
static const char *const ATTR_NAMES[A_COUNT] = {
    "code.function.name", "code.namespace", "code.function", "code.file.path", "code.filepath",
    "code.line.number", "code.lineno",
    "http.request.method", "http.method", "http.route", "url.template", "server.address",
    "net.peer.name", "rpc.system", "rpc.service", "rpc.method", "db.system.name", "db.system",
    "db.query.summary", "db.query.text", "db.statement", "db.operation.name", "db.operation", "db.collection.name", "messaging.operation.name",
    "messaging.destination.name", "http.response.status_code", "http.status_code",
    "service.name", "service.version", "vcs.ref.head.revision",
    "deployment.environment.name", "deployment.environment",
};

#define KEYIS(lit) (n == (Py_ssize_t)sizeof(lit) - 1 && memcmp(k, lit, sizeof(lit) - 1) == 0)

static int attr_slot(const uint8_t *k, Py_ssize_t n) {
    switch (n) {
    case 9: if (KEYIS("db.system")) return A_DB_SYSTEM_OLD; break;
    case 10:
        if (KEYIS("http.route")) return A_HTTP_ROUTE;
        if (KEYIS("rpc.system")) return A_RPC_SYSTEM;
        if (KEYIS("rpc.method")) return A_RPC_METHOD;
        break;
    case 11:
        if (KEYIS("code.lineno")) return A_LINENO;
        if (KEYIS("http.method")) return A_HTTP_METHOD_OLD;
        if (KEYIS("rpc.service")) return A_RPC_SERVICE;
        break;
    case 12:
        if (KEYIS("service.name")) return A_SERVICE_NAME;
        if (KEYIS("url.template")) return A_URL_TEMPLATE;
        if (KEYIS("db.operation")) return A_DB_OPERATION_OLD;
        if (KEYIS("db.statement")) return A_DB_TEXT_OLD;
        break;
    case 13:
        if (KEYIS("code.function")) return A_FUNCTION;
        if (KEYIS("code.filepath")) return A_FILEPATH;
        if (KEYIS("net.peer.name")) return A_NET_PEER_NAME;
        if (KEYIS("db.query.text")) return A_DB_TEXT;
        break;
    case 14:
        if (KEYIS("code.namespace")) return A_NAMESPACE;
        if (KEYIS("code.file.path")) return A_FILE_PATH;
        if (KEYIS("server.address")) return A_SERVER_ADDRESS;
        if (KEYIS("db.system.name")) return A_DB_SYSTEM;
        break;
    case 15: if (KEYIS("service.version")) return A_SERVICE_VERSION; break;
    case 16:
        if (KEYIS("code.line.number")) return A_LINE_NUMBER;
        if (KEYIS("db.query.summary")) return A_DB_SUMMARY;
        if (KEYIS("http.status_code")) return A_HTTP_STATUS_OLD;
        break;
    case 17: if (KEYIS("db.operation.name")) return A_DB_OPERATION; break;
    case 18:
        if (KEYIS("code.function.name")) return A_FUNCTION_NAME;
        if (KEYIS("db.collection.name")) return A_DB_COLLECTION;
        break;
    case 19: if (KEYIS("http.request.method")) return A_HTTP_METHOD; break;
    case 21: if (KEYIS("vcs.ref.head.revision")) return A_REVISION; break;
    case 22: if (KEYIS("deployment.environment")) return A_ENV; break;
    case 24: if (KEYIS("messaging.operation.name")) return A_MSG_OPERATION; break;
    case 25: if (KEYIS("http.response.status_code")) return A_HTTP_STATUS; break;
    case 26: if (KEYIS("messaging.destination.name")) return A_MSG_DESTINATION; break;
    case 27: if (KEYIS("deployment.environment.name")) return A_ENV_NAME; break;
    }
    return -1;
}

/* One AnyValue occurrence (budget `depth`) into v: the last oneof member on the wire wins. */
static int parse_any_value(const uint8_t *s, Py_ssize_t n, val_t *v, int depth) {
    cur_t c = {s, s + n};
    fld_t f = {0};
    int st;
    while (c.p < c.end) {
        if ((st = vfield(&c, M_ANY_VALUE, depth, &f))) return st;
        switch (f.field) {
        case 1: if (f.wt == 2) { v->kind = VK_STR; v->s = f.s; v->n = f.n; } break;
        case 2: if (f.wt == 0) { v->kind = VK_BOOL; v->i = f.u != 0; } break;
        case 3: if (f.wt == 0) { v->kind = VK_INT; v->i = (int64_t)f.u; } break;
        case 4: if (f.wt == 1) { v->kind = VK_DOUBLE; memcpy(&v->d, &f.u, 8); } break;
        case 5: case 6: case 7: if (f.wt == 2) v->kind = VK_UNSUPPORTED; break;
        case 8: /* string_value_strindex, an int32 */
            if (f.wt == 0) { v->kind = VK_INT; v->i = (int32_t)(uint32_t)f.u; }
            break;
        }
        if ((st = CHECK_SUB(f, depth))) return st;
    }
    return ST_OK;
}

/* A KeyValue (budget `depth`): its key (the last on the wire) and its `value` fields. */
typedef struct { const uint8_t *key; Py_ssize_t keylen; int nvalues; const uint8_t *vs; Py_ssize_t vn; } kv_t;

ALWAYS_INLINE int parse_kv(const uint8_t *s, Py_ssize_t n, kv_t *kv, int depth) {
    cur_t c = {s, s + n};
    fld_t f = {0};
    int st;
    kv->key = (const uint8_t *)"";
    kv->keylen = 0;
    kv->nvalues = 0;
    while (c.p < c.end) {
        if ((st = vfield(&c, M_KEY_VALUE, depth, &f))) return st;
        if (f.wt != 2) continue;
        if (f.field == 1) { kv->key = f.s; kv->keylen = f.n; }
        else if (f.field == 2) { kv->nvalues++; kv->vs = f.s; kv->vn = f.n; }
        else if ((st = CHECK_SUB(f, depth))) return st;
    }
    return ST_OK;
}

/* The values of a KeyValue: read into v (None when it has none; occurrences merge), or
 * only checked when v is NULL. */
static int kv_value(const uint8_t *s, Py_ssize_t n, const kv_t *kv, val_t *v, int depth) {
    if (v) v->kind = VK_NONE;
    if (kv->nvalues == 1)
        return v ? parse_any_value(kv->vs, kv->vn, v, depth - 1)
                 : validate(kv->vs, kv->vs + kv->vn, M_ANY_VALUE, depth - 1, &unused_count);
    cur_t c = {s, s + n};
    fld_t f = {0};
    int st;
    for (int left = kv->nvalues; left && c.p < c.end;) {
        if (!next_field(&c, &f)) return ST_CORRUPT;
        if (f.field != 2 || f.wt != 2) continue;
        left--;
        st = v ? parse_any_value(f.s, f.n, v, depth - 1)
               : validate(f.s, f.s + f.n, M_ANY_VALUE, depth - 1, &unused_count);
        if (st) return st;
    }
    return ST_OK;
}

/* The KeyValue encoding every SDK writes: key (field 1), then one value (field 2) with one
 * scalar member (string, bool, int, double, strindex), each length below 128. 1 when s is
 * that and valid (v then holds the value), 0 for anything else, which the caller then
 * reads with the general code, which also finds any error. */
ALWAYS_INLINE int plain_kv(const uint8_t *s, Py_ssize_t n, const uint8_t **key, Py_ssize_t *keylen, val_t *v) {
    if (n < 4 || s[0] != 0x0a || s[1] >= 0x80 || s[1] + 4 > n) return 0;
    const uint8_t *p = s + 2 + s[1];
    if (p[0] != 0x12 || p[1] >= 0x80 || p + 2 + p[1] != s + n) return 0;
    const uint8_t *a = p + 2;
    Py_ssize_t an = p[1];
    if (an == 0) {
        v->kind = VK_NONE;
    } else {
        cur_t c = {a + 1, a + an};
        uint64_t u;
        switch (a[0]) {
        case 0x0a: /* string_value */
            if (an < 2 || a[1] >= 0x80 || a[1] + 2 != an || !utf8_valid(a + 2, a[1])) return 0;
            v->kind = VK_STR; v->s = a + 2; v->n = a[1];
            break;
        case 0x10: /* bool_value */
            if (!rd_varint(&c, &u) || c.p != c.end) return 0;
            v->kind = VK_BOOL; v->i = u != 0;
            break;
        case 0x18: /* int_value */
            if (!rd_varint(&c, &u) || c.p != c.end) return 0;
            v->kind = VK_INT; v->i = (int64_t)u;
            break;
        case 0x21: /* double_value */
            if (an != 9) return 0;
            u = le64(a + 1);
            v->kind = VK_DOUBLE; memcpy(&v->d, &u, 8);
            break;
        case 0x40: /* string_value_strindex */
            if (!rd_varint(&c, &u) || c.p != c.end) return 0;
            v->kind = VK_INT; v->i = (int32_t)(uint32_t)u;
            break;
        default:
            return 0;
        }
    }
    if (!utf8_valid(s + 2, s[1])) return 0;
    *key = s + 2;
    *keylen = s[1];
    return 1;
}

/* A KeyValue into slots[0:nslots] when its key is one of them (the last one wins). */
ALWAYS_INLINE int collect_attr(const uint8_t *s, Py_ssize_t n, val_t *slots, int nslots, int depth) {
    const uint8_t *key;
    Py_ssize_t keylen;
    val_t v;
    if (depth > 0 && plain_kv(s, n, &key, &keylen, &v)) {
        int slot = attr_slot(key, keylen);
        if (slot >= 0 && slot < nslots) slots[slot] = v;
        return ST_OK;
    }
    kv_t kv;
    int st = parse_kv(s, n, &kv, depth);
    if (st) return st;
    int slot = attr_slot(kv.key, kv.keylen);
    return kv_value(s, n, &kv, slot >= 0 && slot < nslots ? &slots[slot] : NULL, depth);
}

ALWAYS_INLINE int truthy(const val_t *v) {
    switch (v->kind) {
    case VK_STR: return v->n > 0;
    case VK_INT: case VK_BOOL: return v->i != 0;
    case VK_DOUBLE: return v->d != 0.0; /* nan is true, as in Python */
    default: return 0;
    }
}

/* A growable byte buffer. */
typedef struct { char *b; size_t len, cap; } sbuf_t;

static int sb_grow(sbuf_t *sb, size_t n) {
    size_t cap = sb->cap ? sb->cap : 256;
    while (cap < sb->len + n) cap *= 2;
    char *b = PyMem_RawRealloc(sb->b, cap);
    if (!b) { PyErr_NoMemory(); return -1; }
    sb->b = b;
    sb->cap = cap;
    return 0;
}

ALWAYS_INLINE int sb_put(sbuf_t *sb, const void *s, size_t n) {
    if (sb->len + n > sb->cap && sb_grow(sb, n) < 0) return -1;
    if (n) memcpy(sb->b + sb->len, s, n);
    sb->len += n;
    return 0;
}

static void sb_free(sbuf_t *sb) { PyMem_RawFree(sb->b); sb->b = NULL; sb->len = sb->cap = 0; }

/* Appends str(value) for str, int, bool and float values as Python writes them; "None". */
static int render(const val_t *v, sbuf_t *sb) {
    switch (v->kind) {
    case VK_STR: return sb_put(sb, v->s, (size_t)v->n);
    case VK_INT: {
        char tmp[24], *p = tmp + sizeof tmp;
        uint64_t u = v->i < 0 ? 0 - (uint64_t)v->i : (uint64_t)v->i;
        do { *--p = (char)('0' + u % 10); u /= 10; } while (u);
        if (v->i < 0) *--p = '-';
        return sb_put(sb, p, (size_t)(tmp + sizeof tmp - p));
    }
    case VK_BOOL: return v->i ? sb_put(sb, "True", 4) : sb_put(sb, "False", 5);
    case VK_DOUBLE: { /* float.__repr__ */
        char *r = PyOS_double_to_string(v->d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (!r) return -1;
        int rc = sb_put(sb, r, strlen(r));
        PyMem_Free(r);
        return rc;
    }
    case VK_NONE: return sb_put(sb, "None", 4);
    default:
        PyErr_SetString(PyExc_SystemError, "_fastdecode: an unsupported value rendered");
        return -1;
    }
}

/* location._function: code.function.name; code.namespace + "." + code.function;
 * code.function. 1 when it wrote a (never empty) name, 0 when there is none, -1 on error. */
static int function_into(const val_t *a, sbuf_t *sb) {
    if (truthy(&a[A_FUNCTION_NAME])) return render(&a[A_FUNCTION_NAME], sb) < 0 ? -1 : 1;
    if (truthy(&a[A_NAMESPACE]) && truthy(&a[A_FUNCTION])) {
        if (render(&a[A_NAMESPACE], sb) < 0 || sb_put(sb, ".", 1) < 0 ||
            render(&a[A_FUNCTION], sb) < 0)
            return -1;
        return 1;
    }
    if (truthy(&a[A_FUNCTION])) return render(&a[A_FUNCTION], sb) < 0 ? -1 : 1;
    return 0;
}

/* str(a or b or default) */
static int render_or(const val_t *a, const val_t *b, const char *dflt, sbuf_t *sb) {
    if (truthy(a)) return render(a, sb);
    if (b && truthy(b)) return render(b, sb);
    return sb_put(sb, dflt, strlen(dflt));
}

/* The first of a, b that is truthy, or NULL. */
static const val_t *either(const val_t *a, const val_t *b) {
    return truthy(a) ? a : (b && truthy(b)) ? b : NULL;
}

#define KIND_SERVER 2
#define KIND_CLIENT 3
#define PUT(lit) (sb_put(sb, lit, sizeof(lit) - 1) < 0)

static int query_into(const val_t *a, sbuf_t *sb);

/* location.operation_of: the operation of a span without code attributes, by the semantic
 * conventions. 1 when it wrote a name, 0 when none applies, -1 on error. */
static int operation_into(const val_t *a, int32_t kind, sbuf_t *sb) {
    const val_t *method = either(&a[A_HTTP_METHOD], &a[A_HTTP_METHOD_OLD]);
    if (method && (kind == KIND_SERVER || kind == KIND_CLIENT)) {
        const val_t *target = kind == KIND_SERVER ? either(&a[A_HTTP_ROUTE], NULL)
                              : either(&a[A_URL_TEMPLATE], either(&a[A_SERVER_ADDRESS], &a[A_NET_PEER_NAME]));
        if ((kind == KIND_SERVER ? PUT("http.server:") : PUT("http.client:")) || render(method, sb) < 0)
            return -1;
        return target && (PUT(" ") || render(target, sb) < 0) ? -1 : 1;
    }
    const val_t *system = either(&a[A_RPC_SYSTEM], NULL), *rpc_method = either(&a[A_RPC_METHOD], NULL);
    if (system && rpc_method) {
        const val_t *service = either(&a[A_RPC_SERVICE], NULL);
        if ((kind == KIND_SERVER ? PUT("rpc.server:") : PUT("rpc.client:")) || render(system, sb) < 0 || PUT(" "))
            return -1;
        if (service && (render(service, sb) < 0 || PUT("/"))) return -1;
        return render(rpc_method, sb) < 0 ? -1 : 1;
    }
    int q = query_into(a, sb);
    if (q) return q;
    const val_t *mop = either(&a[A_MSG_OPERATION], NULL), *dest = either(&a[A_MSG_DESTINATION], NULL);
    if (mop && dest)
        return PUT("messaging:") || render(mop, sb) < 0 || PUT(" ") || render(dest, sb) < 0 ? -1 : 1;
    return 0;
}

static int normalized_into(const val_t *v, sbuf_t *sb);

/* location.query_of: the query of a database call (a client span's comes before its code
 * attributes). 1 when it wrote one, 0 when the span is no database call or names no query,
 * -1 on error. */
static int query_into(const val_t *a, sbuf_t *sb) {
    const val_t *db = either(&a[A_DB_SYSTEM], &a[A_DB_SYSTEM_OLD]);
    if (!db) return 0;
    const val_t *summary = either(&a[A_DB_SUMMARY], NULL);
    const val_t *text = either(&a[A_DB_TEXT], &a[A_DB_TEXT_OLD]);
    const val_t *op = either(&a[A_DB_OPERATION], &a[A_DB_OPERATION_OLD]);
    const val_t *coll = either(&a[A_DB_COLLECTION], NULL);
    if (!(summary || text || op || coll)) return 0;
    size_t len0 = sb->len;
    if (PUT("db:") || render(db, sb) < 0 || PUT(" ")) return -1;
    if (summary) return render(summary, sb) < 0 ? -1 : 1;
    if (text) {
        int got = normalized_into(text, sb);
        if (got == 0) sb->len = len0; /* a text that normalises to nothing names no query */
        return got;
    }
    if (op && render(op, sb) < 0) return -1;
    if (op && coll && PUT(" ")) return -1;
    if (coll && render(coll, sb) < 0) return -1;
    return 1;
}

/* location.client_error_on_server: a server span answering 4xx is no error of the server. */
static int client_error_on_server(const val_t *a, int32_t kind) {
    if (kind != KIND_SERVER) return 0;
    const val_t *v = a[A_HTTP_STATUS].kind != VK_NONE ? &a[A_HTTP_STATUS] : &a[A_HTTP_STATUS_OLD];
    return v->kind == VK_INT && v->i >= 400 && v->i < 500;
}

static int has_unsupported(const val_t *a, int n) {
    for (int i = 0; i < n; i++)
        if (a[i].kind == VK_UNSUPPORTED) return 1;
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* A hash table of byte strings -> index, SipHash-1-3 with a random key per process.    */

static uint64_t SIP_K0, SIP_K1;

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                           \
    do {                                                                   \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);          \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                             \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                             \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);          \
    } while (0)

static uint64_t siphash13(const uint8_t *in, size_t len) {
    uint64_t v0 = 0x736f6d6570736575ULL ^ SIP_K0, v1 = 0x646f72616e646f6dULL ^ SIP_K1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ SIP_K0, v3 = 0x7465646279746573ULL ^ SIP_K1;
    uint64_t b = (uint64_t)len << 56;
    const uint8_t *end = in + (len & ~(size_t)7);
    for (; in != end; in += 8) {
        uint64_t m = le64(in);
        v3 ^= m; SIPROUND; v0 ^= m;
    }
    switch (len & 7) {
    case 7: b |= (uint64_t)in[6] << 48; /* fall through */
    case 6: b |= (uint64_t)in[5] << 40; /* fall through */
    case 5: b |= (uint64_t)in[4] << 32; /* fall through */
    case 4: b |= (uint64_t)in[3] << 24; /* fall through */
    case 3: b |= (uint64_t)in[2] << 16; /* fall through */
    case 2: b |= (uint64_t)in[1] << 8;  /* fall through */
    case 1: b |= (uint64_t)in[0];       /* fall through */
    case 0: break;
    }
    v3 ^= b; SIPROUND; v0 ^= b;
    v2 ^= 0xff;
    SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

typedef struct { uint64_t h; size_t off, len; int32_t idx; } hent_t;
typedef struct { hent_t *e; size_t cap, used; sbuf_t keys; } htab_t;

static void ht_free(htab_t *t) {
    PyMem_RawFree(t->e);
    t->e = NULL;
    t->cap = t->used = 0;
    sb_free(&t->keys);
}

static int ht_grow(htab_t *t) {
    size_t cap = t->cap ? t->cap * 2 : 64;
    hent_t *e = PyMem_RawMalloc(cap * sizeof(hent_t));
    if (!e) { PyErr_NoMemory(); return -1; }
    for (size_t i = 0; i < cap; i++) e[i].idx = -1;
    for (size_t i = 0; i < t->cap; i++) {
        if (t->e[i].idx < 0) continue;
        size_t j = (size_t)t->e[i].h & (cap - 1);
        while (e[j].idx >= 0) j = (j + 1) & (cap - 1);
        e[j] = t->e[i];
    }
    PyMem_RawFree(t->e);
    t->e = e;
    t->cap = cap;
    return 0;
}

/* The index stored under key; else -1 and *slot, where ht_insert puts it; -2 on error. */
static int32_t ht_find(htab_t *t, const char *key, size_t len, uint64_t h, size_t *slot) {
    if ((t->used + 1) * 2 > t->cap && ht_grow(t) < 0) return -2;
    size_t j = (size_t)h & (t->cap - 1);
    while (t->e[j].idx >= 0) {
        hent_t *e = &t->e[j];
        if (e->h == h && e->len == len && memcmp(t->keys.b + e->off, key, len) == 0) return e->idx;
        j = (j + 1) & (t->cap - 1);
    }
    *slot = j;
    return -1;
}

static int ht_insert(htab_t *t, size_t slot, const char *key, size_t len, uint64_t h, int32_t idx) {
    size_t off = t->keys.len;
    if (sb_put(&t->keys, key, len) < 0) return -1;
    t->e[slot].h = h;
    t->e[slot].off = off;
    t->e[slot].len = len;
    t->e[slot].idx = idx;
    t->used++;
    return 0;
}

/* location.normalize_query, which stays in Python (set_query_normalizer), with its results
 * kept here by the text's bytes: a query recurs in request after request. Bounded: cleared
 * when full. Only touched with the GIL held, which the whole decode holds. */
static PyObject *query_normalizer; /* str -> str */
static htab_t qcache_tab;
static PyObject *qcache_vals; /* list: index (in qcache_tab) -> normalised text, UTF-8 bytes */
static sbuf_t qtmp;
#define QCACHE_MAX 16384
#define QCACHE_TEXT_MAX 4096

/* The normalised text of v (rendered as str() renders it) put in sb; 1 when not empty, 0
 * when it is, -1 on error. */
static int normalized_into(const val_t *v, sbuf_t *sb) {
    qtmp.len = 0;
    if (render(v, &qtmp) < 0) return -1;
    uint64_t h = siphash13((const uint8_t *)qtmp.b, qtmp.len);
    size_t slot;
    int32_t i = ht_find(&qcache_tab, qtmp.b, qtmp.len, h, &slot);
    if (i == -2) return -1;
    PyObject *b = NULL; /* a new reference to the normalised text's bytes */
    if (i >= 0) {
        b = Py_NewRef(PyList_GET_ITEM(qcache_vals, i));
    } else {
        if (!query_normalizer) {
            PyErr_SetString(PyExc_SystemError, "_fastdecode: set_query_normalizer was not called");
            return -1;
        }
        PyObject *text = PyUnicode_DecodeUTF8(qtmp.b, (Py_ssize_t)qtmp.len, "strict");
        if (!text) return -1;
        /* The call runs Python: another thread may decode meanwhile and change qtmp and the
         * cache. The text object keeps this key; its slot is looked for again after. */
        PyObject *out = PyObject_CallOneArg(query_normalizer, text);
        if (out) {
            b = PyUnicode_Check(out) ? PyUnicode_AsUTF8String(out) : NULL;
            if (!b && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "the query normalizer must return str");
            Py_DECREF(out);
        }
        Py_ssize_t klen = 0;
        const char *key = b ? PyUnicode_AsUTF8AndSize(text, &klen) : NULL;
        if (b && !key) Py_CLEAR(b);
        /* (a text above QCACHE_TEXT_MAX bytes is normalised each time: the cache stays small
         * in bytes as well as in entries) */
        if (b && klen <= QCACHE_TEXT_MAX) {
            if (!qcache_vals || PyList_GET_SIZE(qcache_vals) >= QCACHE_MAX) {
                Py_XSETREF(qcache_vals, PyList_New(0));
                ht_free(&qcache_tab);
            }
            int32_t again = qcache_vals ? ht_find(&qcache_tab, key, (size_t)klen, h, &slot) : -2;
            if (again == -1) {
                int32_t n = (int32_t)PyList_GET_SIZE(qcache_vals);
                if (PyList_Append(qcache_vals, b) < 0 || ht_insert(&qcache_tab, slot, key, (size_t)klen, h, n) < 0)
                    again = -2;
            }
            if (again == -2) Py_CLEAR(b);
        }
        Py_DECREF(text);
        if (!b) return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(b);
    int rc = n ? (sb_put(sb, PyBytes_AS_STRING(b), (size_t)n) < 0 ? -1 : 1) : 0;
    Py_DECREF(b);
    return rc;
}


/* ------------------------------------------------------------------------------------ */
/* The walk: checks every field as upb would, reads what decode.decode_message reads    */

enum { R_TRACE_ID, R_SPAN_ID, R_TIME, R_ORDER, R_FUTURE, R_TOO_LONG, R_COUNT }; /* decode.REASONS */
#define MAX_END_NS (((uint64_t)1 << 62) - 1) /* decode.MAX_END_NS */
/* The loc_tab index of a location refused for a value too long (not in the locations list). */
#define LOC_REFUSED INT32_MAX
#define STATUS_ERROR 2

#define NCOLS 9
/* loc ver start end error trace_id span_id parent_id kind */
static const Py_ssize_t WIDTHS[NCOLS] = {4, 4, 8, 8, 1, 16, 8, 8, 1};

typedef struct {
    Py_ssize_t n, cap;
    PyObject *cols[NCOLS]; /* bytearrays of cap rows, cut to n at the end */
    int32_t *loc, *ver;
    int64_t *start, *end;
    uint8_t *err, *tid, *sid, *pid, *kind;
    PyObject *locations, *versions, *exceptions;
    Py_ssize_t reasons[R_COUNT];
    int reason_order[R_COUNT], nreasons;
    htab_t loc_tab, ver_tab;
    sbuf_t key, tmp, res;
    uint64_t max_end;  /* spans ending later are refused (R_FUTURE) */
    size_t max_len;    /* a value kept longer than this many characters: R_TOO_LONG; 0: no limit */
} ctx_t;

/* The ScopeSpans being read: its scope name is looked for only when a location needs it. */
typedef struct { const uint8_t *s; Py_ssize_t n; int known; const uint8_t *name; Py_ssize_t namelen; } scope_t;

/* InstrumentationScope.name of a ScopeSpans: scope occurrences merge, the last name wins.
 * It may come after the span being read, where the walk has not checked it yet. */
static int scope_name(scope_t *sc) {
    cur_t c = {sc->s, sc->s + sc->n};
    fld_t f = {0}, g = {0};
    sc->name = (const uint8_t *)"";
    sc->namelen = 0;
    while (c.p < c.end) {
        if (!next_field(&c, &f)) return ST_CORRUPT;
        if (f.field != 1 || f.wt != 2) continue;
        cur_t e = {f.s, f.s + f.n};
        while (e.p < e.end) {
            if (!next_field(&e, &g)) return ST_CORRUPT;
            if (g.field == 1 && g.wt == 2) { sc->name = g.s; sc->namelen = g.n; }
        }
    }
    if (!utf8_valid(sc->name, sc->namelen)) return ST_UTF8;
    sc->known = 1;
    return ST_OK;
}

typedef struct {
    val_t a[A_COUNT];
    PyObject *env, *service;
    const char *envb, *svcb; /* their UTF-8 bytes (in ctx_t.res), for the location cache key */
    size_t envlen, svclen;
    int32_t vi;
    uint32_t index;
    int too_long; /* environment, service, version or revision over max_len: its spans are refused */
} res_t;

/* Location objects made so far, by their fields' bytes (see set_location_type): a location
 * recurs in request after request, and making its strings, tuple and object each time cost
 * more than the rest of the span. Bounded: cleared when full, as decode._LOCATIONS is. Only
 * touched with the GIL held, which the whole decode holds. */
#define LOC_CACHE_MAX (1 << 15)
static PyObject *location_type; /* called with the six fields; NULL: locations are tuples */
static PyObject *loc_cache;     /* list: index (in loc_cache_tab) -> Location */
static htab_t loc_cache_tab;

static int grow_columns(ctx_t *x) {
    Py_ssize_t cap = x->cap ? 2 * x->cap : 256;
    for (int i = 0; i < NCOLS; i++) {
        if (!x->cols[i]) {
            if (!(x->cols[i] = PyByteArray_FromStringAndSize(NULL, cap * WIDTHS[i]))) return -1;
        } else if (PyByteArray_Resize(x->cols[i], cap * WIDTHS[i]) < 0) {
            return -1;
        }
    }
    x->loc = (int32_t *)PyByteArray_AS_STRING(x->cols[0]);
    x->ver = (int32_t *)PyByteArray_AS_STRING(x->cols[1]);
    x->start = (int64_t *)PyByteArray_AS_STRING(x->cols[2]);
    x->end = (int64_t *)PyByteArray_AS_STRING(x->cols[3]);
    x->err = (uint8_t *)PyByteArray_AS_STRING(x->cols[4]);
    x->tid = (uint8_t *)PyByteArray_AS_STRING(x->cols[5]);
    x->sid = (uint8_t *)PyByteArray_AS_STRING(x->cols[6]);
    x->pid = (uint8_t *)PyByteArray_AS_STRING(x->cols[7]);
    x->kind = (uint8_t *)PyByteArray_AS_STRING(x->cols[8]);
    x->cap = cap;
    return 0;
}

static PyObject *str_of(const char *s, size_t n) {
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)n, "strict");
}

static void reject(ctx_t *x, int reason) {
    if (x->reasons[reason]++ == 0) x->reason_order[x->nreasons++] = reason;
}

/* Whether UTF-8 s[0:n] (valid) has more than max_len characters, as Python's len() counts
 * them: every byte but continuation bytes starts one. */
static int too_long(const ctx_t *x, const char *s, size_t n) {
    if (!x->max_len || n <= x->max_len) return 0;
    size_t chars = 0;
    for (size_t i = 0; i < n; i++) chars += ((uint8_t)s[i] & 0xC0) != 0x80;
    return chars > x->max_len;
}

/* A new location: file and line by the fallbacks of location.file_of and line_of. When one
 * of its values is too long, *refused is set and nothing is added. */
static int new_location(ctx_t *x, const res_t *r, const val_t *code, const char *fn, size_t fnlen,
                        scope_t *scope, int *refused) {
    const val_t *files[4] = {&code[A_FILE_PATH], &code[A_FILEPATH], &r->a[A_FILE_PATH], &r->a[A_FILEPATH]};
    const val_t *lines[4] = {&code[A_LINE_NUMBER], &code[A_LINENO], &r->a[A_LINE_NUMBER], &r->a[A_LINENO]};
    const val_t *file = NULL, *line = NULL;
    PyObject *fo = NULL, *lo = NULL, *so = NULL, *fno = NULL, *t = NULL;
    int by_name = fnlen >= 5 && memcmp(fn, "span:", 5) == 0, rc = ST_PYTHON;
    if (!scope->known && (rc = scope_name(scope))) return rc;
    rc = ST_PYTHON;
    for (int i = 0; i < 4 && !file; i++)
        if (truthy(files[i])) file = files[i];
    for (int i = 0; i < 4 && !line; i++) /* v not in (None, "") */
        if (lines[i]->kind != VK_NONE && !(lines[i]->kind == VK_STR && lines[i]->n == 0)) line = lines[i];
    /* The scope name: part of a span-name location's identity; beside a code location only
     * shown, so dropped there rather than refusing the location when too long. */
    const char *scb = (const char *)scope->name;
    size_t sclen = (size_t)scope->namelen;
    if (!by_name && too_long(x, scb, sclen)) sclen = 0;
    /* The identity key: five lengths, then env, service, function, file, line and scope. */
    sbuf_t *id = &x->tmp;
    size_t lens[5] = {r->envlen, r->svclen, fnlen, 0, 0};
    id->len = 0;
    if (sb_put(id, lens, sizeof lens) < 0 || sb_put(id, r->envb, r->envlen) < 0 ||
        sb_put(id, r->svcb, r->svclen) < 0 || sb_put(id, fn, fnlen) < 0)
        return ST_PYTHON;
    size_t file_at = id->len;
    if (file && render(file, id) < 0) return ST_PYTHON;
    size_t line_at = id->len;
    if (line && render(line, id) < 0) return ST_PYTHON;
    size_t scope_at = id->len;
    if (sb_put(id, scb, sclen) < 0) return ST_PYTHON;
    lens[3] = line_at - file_at;
    lens[4] = scope_at - line_at;
    if (too_long(x, fn, fnlen) || too_long(x, id->b + file_at, lens[3]) ||
        too_long(x, id->b + line_at, lens[4]) || too_long(x, scb, sclen)) {
        *refused = 1; /* before the cache: a limit may differ from one call to the next */
        return ST_OK;
    }
    memcpy(id->b, lens, sizeof lens);
    uint64_t h = 0;
    size_t slot = 0;
    if (location_type) {
        h = siphash13((const uint8_t *)id->b, id->len);
        int32_t ci = ht_find(&loc_cache_tab, id->b, id->len, h, &slot);
        if (ci == -2) return ST_PYTHON;
        if (ci >= 0) return PyList_Append(x->locations, PyList_GET_ITEM(loc_cache, ci)) < 0 ? ST_PYTHON : ST_OK;
    }
    if (!(fo = str_of(id->b + file_at, lens[3]))) goto done;
    if (!(lo = str_of(id->b + line_at, lens[4]))) goto done;
    if (!(so = str_of(scb, sclen))) goto done;
    if (!(fno = str_of(fn, fnlen))) goto done;
    if (!(t = PyTuple_Pack(6, r->env, r->service, fno, fo, lo, so))) goto done;
    if (location_type) {
        PyObject *loc = PyObject_Call(location_type, t, NULL);
        if (!loc) goto done;
        Py_SETREF(t, loc);
        /* Python code ran: another thread may have changed the cache meanwhile; look again. */
        int32_t ci = ht_find(&loc_cache_tab, id->b, id->len, h, &slot);
        if (ci == -2) goto done;
        if (ci >= 0) {
            Py_SETREF(t, Py_NewRef(PyList_GET_ITEM(loc_cache, ci)));
        } else {
            if (PyList_GET_SIZE(loc_cache) >= LOC_CACHE_MAX) { /* full: start again */
                ht_free(&loc_cache_tab);
                if (PyList_SetSlice(loc_cache, 0, PyList_GET_SIZE(loc_cache), NULL) < 0) goto done;
                if (ht_find(&loc_cache_tab, id->b, id->len, h, &slot) == -2) goto done;
            }
            if (PyList_Append(loc_cache, t) < 0) goto done;
            if (ht_insert(&loc_cache_tab, slot, id->b, id->len, h, (int32_t)PyList_GET_SIZE(loc_cache) - 1) < 0) {
                PyList_SetSlice(loc_cache, PyList_GET_SIZE(loc_cache) - 1, PyList_GET_SIZE(loc_cache), NULL);
                goto done;
            }
        }
    }
    rc = PyList_Append(x->locations, t) < 0 ? ST_PYTHON : ST_OK;
done:
    Py_XDECREF(t); Py_XDECREF(fo); Py_XDECREF(lo); Py_XDECREF(so); Py_XDECREF(fno);
    return rc;
}

/* Exception events of an accepted span (budget `depth`, already checked): events named
 * "exception", the str() of their first exception.type attribute when not empty. Sets
 * *refused and stops at a type longer than max_len (the caller drops what was added). */
static int span_exceptions(ctx_t *x, const uint8_t *s, Py_ssize_t n, int depth, int *refused) {
    cur_t c = {s, s + n};
    fld_t f = {0}, g = {0};
    int st;
    while (c.p < c.end) {
        if (!next_field(&c, &f)) return ST_CORRUPT;
        if (f.field != 11 || f.wt != 2) continue;
        const uint8_t *name = NULL;
        Py_ssize_t namelen = 0;
        cur_t e = {f.s, f.s + f.n};
        while (e.p < e.end) {
            if (!next_field(&e, &g)) return ST_CORRUPT;
            if (g.field == 2 && g.wt == 2) { name = g.s; namelen = g.n; }
        }
        if (namelen != 9 || memcmp(name, "exception", 9) != 0) continue;
        e.p = f.s;
        while (e.p < e.end) {
            if (!next_field(&e, &g)) return ST_CORRUPT;
            if (g.field != 3 || g.wt != 2) continue;
            kv_t kv;
            if ((st = parse_kv(g.s, g.n, &kv, depth - 2))) return st;
            if (kv.keylen != 14 || memcmp(kv.key, "exception.type", 14) != 0) continue;
            val_t v;
            if ((st = kv_value(g.s, g.n, &kv, &v, depth - 2))) return st;
            if (v.kind == VK_UNSUPPORTED) return ST_FALLBACK;
            x->tmp.len = 0;
            if (render(&v, &x->tmp) < 0) return ST_PYTHON;
            if (too_long(x, x->tmp.b, x->tmp.len)) { *refused = 1; return ST_OK; }
            if (x->tmp.len) {
                PyObject *t = Py_BuildValue("(ns#)", x->n, x->tmp.b, (Py_ssize_t)x->tmp.len);
                if (!t) return ST_PYTHON;
                int rc = PyList_Append(x->exceptions, t);
                Py_DECREF(t);
                if (rc < 0) return ST_PYTHON;
            }
            break;
        }
    }
    return ST_OK;
}

static int do_span(ctx_t *x, const res_t *r, scope_t *scope, const uint8_t *s, Py_ssize_t n, int depth) {
    const uint8_t *tid = NULL, *sid = NULL, *pid = NULL, *name = (const uint8_t *)"";
    Py_ssize_t tidn = 0, sidn = 0, pidn = 0, namen = 0;
    uint64_t st_ns = 0, en_ns = 0;
    int32_t status = 0, kind = 0;
    int events = 0, st;
    val_t code[A_SPAN_COUNT];
    for (int i = 0; i < A_SPAN_COUNT; i++) code[i].kind = VK_NONE;
    cur_t c = {s, s + n};
    fld_t f = {0};
    while (c.p < c.end) {
        if ((st = vfield(&c, M_SPAN, depth, &f))) return st;
        switch (f.field) {
        case 1: if (f.wt == 2) { tid = f.s; tidn = f.n; } break;
        case 2: if (f.wt == 2) { sid = f.s; sidn = f.n; } break;
        case 4: if (f.wt == 2) { pid = f.s; pidn = f.n; } break;
        case 5: if (f.wt == 2) { name = f.s; namen = f.n; } break;
        case 6: if (f.wt == 0) kind = (int32_t)(uint32_t)f.u; break;
        case 7: if (f.wt == 1) st_ns = f.u; break;
        case 8: if (f.wt == 1) en_ns = f.u; break;
        case 9:
            if (f.wt == 2) {
                if ((st = collect_attr(f.s, f.n, code, A_SPAN_COUNT, depth - 1))) return st;
                continue;
            }
            break;
        case 11: if (f.wt == 2) events = 1; break;
        case 15:
            if (f.wt == 2) { /* Status; occurrences merge, the last code wins */
                cur_t sc = {f.s, f.s + f.n};
                fld_t g = {0};
                while (sc.p < sc.end) {
                    if ((st = vfield(&sc, M_STATUS, depth - 1, &g))) return st;
                    if (g.field == 3 && g.wt == 0) status = (int32_t)(uint32_t)g.u;
                    if ((st = CHECK_SUB(g, depth - 1))) return st;
                }
                continue;
            }
            break;
        }
        if ((st = CHECK_SUB(f, depth))) return st;
    }
    int zero = 1;
    for (Py_ssize_t i = 0; i < tidn && zero; i++) zero = tid[i] == 0;
    if (tidn != 16 || zero) { reject(x, R_TRACE_ID); return ST_OK; }
    zero = 1;
    for (Py_ssize_t i = 0; i < sidn && zero; i++) zero = sid[i] == 0;
    if (sidn != 8 || zero) { reject(x, R_SPAN_ID); return ST_OK; }
    if (!st_ns || !en_ns) { reject(x, R_TIME); return ST_OK; }
    if (en_ns < st_ns) { reject(x, R_ORDER); return ST_OK; }
    if (en_ns > x->max_end) { reject(x, R_FUTURE); return ST_OK; }
    if (has_unsupported(code, A_SPAN_COUNT)) return ST_FALLBACK;
    if (r->too_long) { reject(x, R_TOO_LONG); return ST_OK; }
    if (x->n >= x->cap && grow_columns(x) < 0) return ST_PYTHON;

    /* Exception types before the location, as decode_message reads them: a span refused for
     * one must not leave a location behind in the batch (the window stage keeps them all). */
    Py_ssize_t exc_before = PyList_GET_SIZE(x->exceptions);
    int refused = 0;
    if (events && (st = span_exceptions(x, s, n, depth, &refused))) return st;
    if (refused) goto refuse;

    /* The location key: the resource's index, then the function. */
    sbuf_t *k = &x->key;
    k->len = 0;
    if (sb_put(k, &r->index, sizeof r->index) < 0) return ST_PYTHON;
    int got = kind == KIND_CLIENT ? query_into(code, k) : 0;
    if (got == 0) got = function_into(code, k);
    if (got == 0) got = function_into(r->a, k);
    if (got == 0) got = operation_into(code, kind, k);
    if (got < 0) return ST_PYTHON;
    if (got == 0 && (sb_put(k, "span:", 5) < 0 || sb_put(k, name, (size_t)namen) < 0)) return ST_PYTHON;
    uint64_t h = siphash13((const uint8_t *)k->b, k->len);
    size_t slot;
    int32_t li = ht_find(&x->loc_tab, k->b, k->len, h, &slot);
    if (li == -2) return ST_PYTHON;
    if (li < 0) {
        li = (int32_t)PyList_GET_SIZE(x->locations);
        if ((st = new_location(x, r, code, k->b + sizeof r->index, k->len - sizeof r->index, scope,
                               &refused)))
            return st;
        if (refused) li = LOC_REFUSED; /* the rest of the request's spans there are refused too */
        if (ht_insert(&x->loc_tab, slot, k->b, k->len, h, li) < 0) return ST_PYTHON;
    }
    if (li == LOC_REFUSED) goto refuse;
    Py_ssize_t i = x->n++;
    x->loc[i] = li;
    x->ver[i] = r->vi;
    x->start[i] = (int64_t)st_ns;
    x->end[i] = (int64_t)en_ns;
    x->err[i] = status == STATUS_ERROR && !client_error_on_server(code, kind);
    memcpy(x->tid + 16 * i, tid, 16);
    memcpy(x->sid + 8 * i, sid, 8);
    if (pidn == 8) memcpy(x->pid + 8 * i, pid, 8);
    else memset(x->pid + 8 * i, 0, 8);
    x->kind[i] = kind >= 0 && kind <= 5 ? (uint8_t)kind : 0;
    return ST_OK;
refuse:
    if (PyList_SetSlice(x->exceptions, exc_before, PY_SSIZE_T_MAX, NULL) < 0) return ST_PYTHON;
    reject(x, R_TOO_LONG);
    return ST_OK;
}

static int do_scope_spans(ctx_t *x, const res_t *r, const uint8_t *s, Py_ssize_t n, int depth) {
    scope_t scope = {s, n, 0, NULL, 0};
    cur_t c = {s, s + n};
    fld_t f = {0}, g = {0};
    int st;
    while (c.p < c.end) {
        if ((st = vfield(&c, M_SCOPE_SPANS, depth, &f))) return st;
        if (f.field == 2 && f.wt == 2) {
            if ((st = do_span(x, r, &scope, f.s, f.n, depth - 1))) return st;
        } else if (f.field == 1 && f.wt == 2) { /* the scope: checked here, its name read lazily */
            cur_t sc = {f.s, f.s + f.n};
            while (sc.p < sc.end) {
                if ((st = vfield(&sc, M_SCOPE, depth - 1, &g))) return st;
                if ((st = CHECK_SUB(g, depth - 1))) return st;
            }
        } else if ((st = CHECK_SUB(f, depth))) {
            return st;
        }
    }
    return ST_OK;
}

static int do_resource_spans(ctx_t *x, uint32_t index, const uint8_t *s, Py_ssize_t n, int depth) {
    res_t r;
    memset(&r, 0, sizeof r);
    r.index = index;
    cur_t c = {s, s + n};
    fld_t f = {0}, g = {0};
    int st;
    /* First everything but the scopes: the resource may come after them; occurrences merge. */
    while (c.p < c.end) {
        if ((st = vfield(&c, M_RESOURCE_SPANS, depth, &f))) return st;
        if (f.field == 2 && f.wt == 2) continue;
        if (f.field == 1 && f.wt == 2) {
            cur_t rc = {f.s, f.s + f.n};
            while (rc.p < rc.end) {
                if ((st = vfield(&rc, M_RESOURCE, depth - 1, &g))) return st;
                if (g.field == 1 && g.wt == 2) {
                    if ((st = collect_attr(g.s, g.n, r.a, A_COUNT, depth - 2))) return st;
                } else if ((st = CHECK_SUB(g, depth - 1))) {
                    return st;
                }
            }
            continue;
        }
        if ((st = CHECK_SUB(f, depth))) return st;
    }
    if (has_unsupported(r.a, A_COUNT)) return ST_FALLBACK;

    /* location.resource_of, then the version table keyed by (service, version, revision) */
    sbuf_t *k = &x->key;
    size_t off[5], len[4];
    const val_t *a = r.a;
    k->len = 0;
    off[0] = k->len; if (render_or(&a[A_ENV_NAME], &a[A_ENV], "", k) < 0) return ST_PYTHON;
    off[1] = k->len; if (render_or(&a[A_SERVICE_NAME], NULL, "unknown_service", k) < 0) return ST_PYTHON;
    off[2] = k->len; if (render_or(&a[A_SERVICE_VERSION], NULL, "", k) < 0) return ST_PYTHON;
    off[3] = k->len; if (render_or(&a[A_REVISION], NULL, "", k) < 0) return ST_PYTHON;
    off[4] = k->len;
    for (int i = 0; i < 4; i++) len[i] = off[i + 1] - off[i];
    for (int i = 0; i < 4; i++) r.too_long |= too_long(x, k->b + off[i], len[i]);
    x->tmp.len = 0; /* the version key: three lengths, then the three strings */
    if (sb_put(&x->tmp, &len[1], 3 * sizeof len[1]) < 0 ||
        sb_put(&x->tmp, k->b + off[1], off[4] - off[1]) < 0)
        return ST_PYTHON;
    st = ST_PYTHON;
    if (!(r.env = str_of(k->b + off[0], len[0])) || !(r.service = str_of(k->b + off[1], len[1])))
        goto done;
    x->res.len = 0; /* x->key is reused by every span; the location keys need these bytes */
    if (sb_put(&x->res, k->b + off[0], off[2] - off[0]) < 0) goto done;
    r.envb = x->res.b;
    r.envlen = len[0];
    r.svcb = x->res.b + len[0];
    r.svclen = len[1];
    uint64_t h = siphash13((const uint8_t *)x->tmp.b, x->tmp.len);
    size_t slot;
    int32_t vi = r.too_long ? -1 : ht_find(&x->ver_tab, x->tmp.b, x->tmp.len, h, &slot);
    if (vi == -2) goto done;
    if (vi < 0 && !r.too_long) { /* the version of a resource refused is not kept either */
        vi = (int32_t)PyList_GET_SIZE(x->versions);
        PyObject *t = Py_BuildValue("(Os#s#)", r.service, k->b + off[2], (Py_ssize_t)len[2],
                                    k->b + off[3], (Py_ssize_t)len[3]);
        if (!t) goto done;
        int rc = PyList_Append(x->versions, t);
        Py_DECREF(t);
        if (rc < 0 || ht_insert(&x->ver_tab, slot, x->tmp.b, x->tmp.len, h, vi) < 0) goto done;
    }
    r.vi = vi;

    st = ST_OK;
    c.p = s;
    while (c.p < c.end) {
        if (!next_field(&c, &f)) { st = ST_CORRUPT; break; }
        if (f.field == 2 && f.wt == 2 && (st = do_scope_spans(x, &r, f.s, f.n, depth - 1))) break;
    }
done:
    Py_XDECREF(r.env);
    Py_XDECREF(r.service);
    return st;
}

static int do_request(ctx_t *x, const uint8_t *s, Py_ssize_t n) {
    cur_t c = {s, s + n};
    fld_t f = {0};
    uint32_t index = 0;
    int st;
    while (c.p < c.end) {
        if ((st = vfield(&c, M_REQUEST, MAX_DEPTH, &f))) return st;
        if (f.field == 1 && f.wt == 2) {
            if ((st = do_resource_spans(x, index++, f.s, f.n, MAX_DEPTH - 1))) return st;
        } else if ((st = CHECK_SUB(f, MAX_DEPTH))) {
            return st;
        }
    }
    return ST_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Module                                                                                */

static void set_malformed(int st) {
    PyErr_SetString(PyExc_ValueError,
                    st == ST_UTF8 ? "String field had bad UTF-8"
                    : st == ST_DEPTH ? "Exceeded the nesting limit (100)"
                                     : "Wire format was corrupt");
}

PyDoc_STRVAR(decode_doc,
"decode(data, max_end_ns=2**62-1, max_attribute_length=0) ->\n"
"    (n, loc, ver, start, end, error, trace_id, span_id, parent_id, kind, locations, versions,\n"
"     exceptions, reasons)\n"
"    or None\n\n"
"The columns of an OTLP ExportTraceServiceRequest; None when the request is left to the\n"
"Python decoder (an attribute read holds a bytes, array or kvlist value); ValueError when\n"
"the bytes are not a request that ParseFromString accepts. Spans ending after max_end_ns,\n"
"or keeping a value longer than max_attribute_length characters (0: no limit), are refused.");

static PyObject *fd_decode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    unsigned long long max_end = MAX_END_NS;
    Py_ssize_t max_len = 0;
    if (!PyArg_ParseTuple(args, "y*|Kn:decode", &buf, &max_end, &max_len)) return NULL;
    const uint8_t *data = buf.buf;
    PyObject *result = NULL, *reasons = NULL;
    ctx_t x;
    memset(&x, 0, sizeof x);
    x.max_end = max_end < MAX_END_NS ? (uint64_t)max_end : MAX_END_NS;
    x.max_len = max_len > 0 ? (size_t)max_len : 0;
    if (grow_columns(&x) < 0) goto out;
    if (!(x.locations = PyList_New(0)) || !(x.versions = PyList_New(0)) ||
        !(x.exceptions = PyList_New(0)))
        goto out;

    int st = do_request(&x, data, buf.len);
    if (st == ST_FALLBACK) { result = Py_NewRef(Py_None); goto out; }
    if (st == ST_PYTHON) goto out;
    if (st != ST_OK) { set_malformed(st); goto out; }

    for (int i = 0; i < NCOLS; i++)
        if (PyByteArray_Resize(x.cols[i], x.n * WIDTHS[i]) < 0) goto out;
    if (!(reasons = PyList_New(x.nreasons))) goto out;
    for (int i = 0; i < x.nreasons; i++) {
        PyObject *t = Py_BuildValue("(in)", x.reason_order[i], x.reasons[x.reason_order[i]]);
        if (!t) goto out;
        PyList_SET_ITEM(reasons, i, t);
    }
    result = Py_BuildValue("(nOOOOOOOOOOOOO)", x.n, x.cols[0], x.cols[1], x.cols[2], x.cols[3],
                           x.cols[4], x.cols[5], x.cols[6], x.cols[7], x.cols[8], x.locations,
                           x.versions, x.exceptions, reasons);
out:
    for (int i = 0; i < NCOLS; i++) Py_XDECREF(x.cols[i]);
    Py_XDECREF(reasons);
    Py_XDECREF(x.locations);
    Py_XDECREF(x.versions);
    Py_XDECREF(x.exceptions);
    ht_free(&x.loc_tab);
    ht_free(&x.ver_tab);
    sb_free(&x.key);
    sb_free(&x.tmp);
    sb_free(&x.res);
    PyBuffer_Release(&buf);
    return result;
}

PyDoc_STRVAR(count_doc,
"count_spans(data) -> int\n\n"
"Spans in a request, checked whole as ParseFromString checks it; ValueError when it does\n"
"not parse.");

static PyObject *fd_count_spans(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *data = buf.buf;
    Py_ssize_t spans = 0;
    int st = validate(data, data + buf.len, M_REQUEST, MAX_DEPTH, &spans);
    PyBuffer_Release(&buf);
    if (st) {
        set_malformed(st);
        return NULL;
    }
    return PyLong_FromSsize_t(spans);
}

PyDoc_STRVAR(schema_doc,
"schema() -> {message full name: {field number: (type, repeated, message type or None)}}\n\n"
"The OTLP schema compiled into this module, to compare with the protobuf descriptors.");

static PyObject *fd_schema(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    PyObject *out = PyDict_New();
    if (!out) return NULL;
    for (int m = 0; m < M_COUNT; m++) {
        PyObject *fields = PyDict_New();
        if (!fields || PyDict_SetItemString(out, MESSAGES[m].name, fields) < 0) {
            Py_XDECREF(fields);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(fields);
        for (int i = 0; i < MESSAGES[m].count; i++) {
            const fdef_t *f = &MESSAGES[m].fields[i];
            PyObject *k = PyLong_FromUnsignedLong(f->number);
            PyObject *v = f->sub >= 0
                ? Py_BuildValue("(iOs)", f->type, f->repeated ? Py_True : Py_False, MESSAGES[f->sub].name)
                : Py_BuildValue("(iOO)", f->type, f->repeated ? Py_True : Py_False, Py_None);
            int rc = (k && v) ? PyDict_SetItem(fields, k, v) : -1;
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (rc < 0) { Py_DECREF(out); return NULL; }
        }
    }
    return out;
}

PyDoc_STRVAR(set_query_normalizer_doc,
"set_query_normalizer(fn)\n\n"
"fn(text) -> str normalises a database query's text (location.normalize_query); its results\n"
"are cached here by the text.");

static PyObject *fd_set_query_normalizer(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_query_normalizer: a callable");
        return NULL;
    }
    Py_XSETREF(query_normalizer, Py_NewRef(arg));
    Py_CLEAR(qcache_vals);
    ht_free(&qcache_tab);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_location_type_doc,
"set_location_type(factory)\n\n"
"From now on decode's locations are factory(env, service, function, file, line, scope),\n"
"made once and cached by their fields (at most 32,768, then the cache starts again);\n"
"None: plain tuples, no cache.");

static PyObject *fd_set_location_type(PyObject *self, PyObject *arg) {
    (void)self;
    if (arg != Py_None && !PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_location_type: a callable or None");
        return NULL;
    }
    ht_free(&loc_cache_tab);
    Py_CLEAR(loc_cache);
    Py_CLEAR(location_type);
    if (arg != Py_None) {
        if (!(loc_cache = PyList_New(0))) return NULL;
        location_type = Py_NewRef(arg);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", fd_decode, METH_VARARGS, decode_doc},
    {"set_location_type", fd_set_location_type, METH_O, set_location_type_doc},
    {"set_query_normalizer", fd_set_query_normalizer, METH_O, set_query_normalizer_doc},
    {"count_spans", fd_count_spans, METH_O, count_doc},
    {"schema", fd_schema, METH_NOARGS, schema_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastdecode",
    "Compiled OTLP ExportTraceServiceRequest decoder (see processor/receiver/decode.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

static PyObject *names_tuple(int from, int to) {
    PyObject *t = PyTuple_New(to - from);
    for (int i = from; t && i < to; i++) {
        PyObject *name = PyUnicode_FromString(ATTR_NAMES[i]);
        if (!name) { Py_CLEAR(t); break; }
        PyTuple_SET_ITEM(t, i - from, name);
    }
    return t;
}

PyMODINIT_FUNC PyInit__fastdecode(void) {
    if (build_lookup() < 0) {
        PyErr_SetString(PyExc_ImportError, "_fastdecode: a schema field type it cannot check");
        return NULL;
    }
    for (int i = 0; i < A_COUNT; i++) {
        if (attr_slot((const uint8_t *)ATTR_NAMES[i], (Py_ssize_t)strlen(ATTR_NAMES[i])) != i) {
            PyErr_SetString(PyExc_ImportError, "_fastdecode: attr_slot disagrees with ATTR_NAMES");
            return NULL;
        }
    }
    /* A random SipHash key, so that a client cannot choose names that collide. */
    PyObject *os = PyImport_ImportModule("os");
    PyObject *rnd = os ? PyObject_CallMethod(os, "urandom", "i", 16) : NULL;
    Py_XDECREF(os);
    if (!rnd) return NULL;
    const uint8_t *k = (const uint8_t *)PyBytes_AsString(rnd);
    if (!k) { Py_DECREF(rnd); return NULL; }
    SIP_K0 = le64(k);
    SIP_K1 = le64(k + 8);
    Py_DECREF(rnd);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    /* the span attributes read, then all the resource attributes read */
    PyObject *code = names_tuple(0, A_SPAN_COUNT), *res = names_tuple(0, A_COUNT);
    if (!code || !res || PyModule_AddObjectRef(m, "SPAN_ATTRIBUTES", code) < 0 ||
        PyModule_AddObjectRef(m, "RESOURCE_ATTRIBUTES", res) < 0) {
        Py_XDECREF(code); Py_XDECREF(res); Py_DECREF(m);
        return NULL;
    }
    Py_DECREF(code);
    Py_DECREF(res);
    return m;
}
