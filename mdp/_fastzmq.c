/* _mdp_fastzmq: whole messages in and out of a libzmq socket in one call, for hot paths.
 *
 * Why: pyzmq moves one frame per Python-level call (receive, then ask whether more follows;
 * send with a flag), so a five-frame MDP message costs a dozen calls through pyzmq's wrappers
 * each way. Here one call drains every waiting message (up to a count), handing each to a
 * callback, and one call sends a whole outbox, with the same libzmq calls pyzmq makes
 * underneath. The callback runs before the next receive, so the receive that ends a drain
 * (finding nothing) comes after every send the callbacks made: that is the check libzmq's
 * edge-triggered fd needs before the caller sleeps on it, made once per drain. `mdp.fastzmq` is the only
 * user and keeps a pure-Python path with the same semantics for when this module is absent.
 *
 * No link to libzmq: the socket must belong to the libzmq that pyzmq loaded (pyzmq bundles its
 * own copy), so `mdp.fastzmq` finds that library in the process and hands us its function
 * addresses (`bind`). Only the stable C ABI is used: zmq_msg_t is 64 opaque bytes, and the
 * flags are libzmq's documented constants.
 *
 * Frames shorter than BIG_FRAME become bytes. Longer ones stay in libzmq's buffer inside a
 * `Frame` object (read-only buffer protocol, len(), .bytes): the broker only passes bodies on,
 * and sending a Frame shares the buffer by reference count instead of copying it.
 *
 * Built by the project's build hook (hatch_build.py) with the source's hash in SOURCE_HASH, so
 * that `mdp.fastzmq` can refuse a build that does not match the source beside it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>

#ifndef MDP_SOURCE_HASH
#define MDP_SOURCE_HASH "unknown"
#endif

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define BIG_FRAME 4096

typedef struct {
    unsigned char _[64] __attribute__((aligned(sizeof(void *))));
} zmq_msg_t;

static int (*z_msg_init)(zmq_msg_t *);
static int (*z_msg_close)(zmq_msg_t *);
static int (*z_msg_recv)(zmq_msg_t *, void *, int);
static int (*z_msg_send)(zmq_msg_t *, void *, int);
static int (*z_msg_copy)(zmq_msg_t *, zmq_msg_t *);
static int (*z_msg_move)(zmq_msg_t *, zmq_msg_t *);
static void *(*z_msg_data)(zmq_msg_t *);
static size_t (*z_msg_size)(const zmq_msg_t *);
static int (*z_msg_more)(const zmq_msg_t *);
static int (*z_send)(void *, const void *, size_t, int);
static int (*z_errno)(void);
static const char *(*z_msg_gets)(const zmq_msg_t *, const char *);
static PyObject *error_class; /* zmq.ZMQError: raised as error_class(errno) */

/* ---------------------------------------------------------------------------------------- */
/* Frame: a received frame of BIG_FRAME bytes or more, still in libzmq's buffer. */

typedef struct {
    PyObject_HEAD
    zmq_msg_t msg;
} FrameObject;

static PyTypeObject FrameType;

static void Frame_dealloc(FrameObject *self) {
    z_msg_close(&self->msg);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t Frame_len(FrameObject *self) { return (Py_ssize_t)z_msg_size(&self->msg); }

static int Frame_getbuffer(FrameObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, z_msg_data(&self->msg),
                             (Py_ssize_t)z_msg_size(&self->msg), 1, flags);
}

static PyObject *Frame_bytes(FrameObject *self, void *closure) {
    (void)closure;
    return PyBytes_FromStringAndSize(z_msg_data(&self->msg), (Py_ssize_t)z_msg_size(&self->msg));
}

static PyBufferProcs Frame_as_buffer = {(getbufferproc)Frame_getbuffer, NULL};
static PySequenceMethods Frame_as_sequence = {.sq_length = (lenfunc)Frame_len};
static PyGetSetDef Frame_getset[] = {
    {"bytes", (getter)Frame_bytes, NULL, "A copy of the frame's bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FrameType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_mdp_fastzmq.Frame",
    .tp_basicsize = sizeof(FrameObject),
    .tp_dealloc = (destructor)Frame_dealloc,
    .tp_as_sequence = &Frame_as_sequence,
    .tp_as_buffer = &Frame_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A large received frame, kept in libzmq's buffer (sent on without a copy).",
    .tp_getset = Frame_getset,
};

/* ---------------------------------------------------------------------------------------- */

static int bound(void) {
    if (z_errno == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_mdp_fastzmq.bind() was not called");
        return 0;
    }
    return 1;
}

static PyObject *raise_zmq(int err) {
    PyObject *exc = PyObject_CallFunction(error_class, "i", err);
    if (exc != NULL) {
        PyErr_SetObject(error_class, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *fz_bind(PyObject *module, PyObject *args) {
    unsigned long long a[12];
    PyObject *cls;
    (void)module;
    if (!PyArg_ParseTuple(args, "(KKKKKKKKKKKK)O", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5],
                          &a[6], &a[7], &a[8], &a[9], &a[10], &a[11], &cls))
        return NULL;
    for (int i = 0; i < 12; i++) {
        if (a[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "a libzmq function address is 0");
            return NULL;
        }
    }
    z_msg_init = (int (*)(zmq_msg_t *))(uintptr_t)a[0];
    z_msg_close = (int (*)(zmq_msg_t *))(uintptr_t)a[1];
    z_msg_recv = (int (*)(zmq_msg_t *, void *, int))(uintptr_t)a[2];
    z_msg_send = (int (*)(zmq_msg_t *, void *, int))(uintptr_t)a[3];
    z_msg_copy = (int (*)(zmq_msg_t *, zmq_msg_t *))(uintptr_t)a[4];
    z_msg_move = (int (*)(zmq_msg_t *, zmq_msg_t *))(uintptr_t)a[5];
    z_msg_data = (void *(*)(zmq_msg_t *))(uintptr_t)a[6];
    z_msg_size = (size_t (*)(const zmq_msg_t *))(uintptr_t)a[7];
    z_msg_more = (int (*)(const zmq_msg_t *))(uintptr_t)a[8];
    z_send = (int (*)(void *, const void *, size_t, int))(uintptr_t)a[9];
    z_errno = (int (*)(void))(uintptr_t)a[10];
    z_msg_gets = (const char *(*)(const zmq_msg_t *, const char *))(uintptr_t)a[11];
    Py_INCREF(cls);
    Py_XSETREF(error_class, cls);
    Py_RETURN_NONE;
}

/* One frame as a Python object: bytes below BIG_FRAME, else a Frame that takes over `msg`
 * (which is left empty). */
static PyObject *frame_object(zmq_msg_t *msg, size_t size) {
    if (size < BIG_FRAME)
        return PyBytes_FromStringAndSize(z_msg_data(msg), (Py_ssize_t)size);
    FrameObject *frame = PyObject_New(FrameObject, &FrameType);
    if (frame == NULL)
        return NULL;
    z_msg_init(&frame->msg);
    z_msg_move(&frame->msg, msg);
    return (PyObject *)frame;
}

/* Receive one whole message without blocking. Returns 1 with *first, *rest (new references)
 * and *biggest (the largest frame after the first), 0 when none is waiting, -1 with an
 * exception set (a libzmq error: *err; or out of memory: *err is 0). With `user_id`, also
 * *user_id (a new reference): the connection's ZAP User-Id (str), or None if it has none. */
static int recv_message(void *sock, PyObject **first, PyObject **rest, size_t *biggest,
                        int *err, PyObject **user_id) {
    zmq_msg_t msg;
    for (;;) {
        z_msg_init(&msg);
        if (z_msg_recv(&msg, sock, ZMQ_DONTWAIT) >= 0)
            break;
        *err = z_errno();
        z_msg_close(&msg);
        if (*err == EAGAIN)
            return 0;
        if (*err != EINTR)
            return -1;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    *err = 0;
    if (user_id != NULL) {
        const char *value = z_msg_gets(&msg, "User-Id");
        if (value != NULL) {
            *user_id = PyUnicode_DecodeUTF8(value, (Py_ssize_t)strlen(value), "replace");
            if (*user_id == NULL) {
                z_msg_close(&msg);
                return -1;
            }
        } else {
            *user_id = Py_NewRef(Py_None);
        }
    }
    size_t size = z_msg_size(&msg);
    int more = z_msg_more(&msg);
    *first = frame_object(&msg, size);
    z_msg_close(&msg);
    *rest = *first == NULL ? NULL : PyList_New(0);
    *biggest = 0;
    while (*rest != NULL && more) {
        z_msg_init(&msg);
        /* The rest of a message is always there once its first frame was read. */
        int rc;
        while ((rc = z_msg_recv(&msg, sock, ZMQ_DONTWAIT)) < 0 && z_errno() == EINTR)
            ;
        if (rc < 0) {
            *err = z_errno();
            z_msg_close(&msg);
            Py_CLEAR(*rest);
            raise_zmq(*err);
            break;
        }
        size = z_msg_size(&msg);
        more = z_msg_more(&msg);
        if (size > *biggest)
            *biggest = size;
        PyObject *frame = frame_object(&msg, size);
        z_msg_close(&msg);
        if (frame == NULL || PyList_Append(*rest, frame) < 0) {
            Py_XDECREF(frame);
            Py_CLEAR(*rest);
            break;
        }
        Py_DECREF(frame);
    }
    if (*rest == NULL) {
        Py_CLEAR(*first);
        if (user_id != NULL)
            Py_CLEAR(*user_id);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    return 1;
}

PyDoc_STRVAR(drain_doc,
"drain(handle, most, limit, on_message, on_oversized, with_user_id) -> int\n\n"
"Receive up to `most` whole messages without blocking from the libzmq socket at address\n"
"`handle` (pyzmq's Socket.underlying), calling on_message(first frame, [the other frames])\n"
"for each before receiving the next. A message with a frame after the first larger than\n"
"`limit` bytes is consumed and dropped, and on_oversized(first frame, size) called instead.\n"
"Returns how many messages were read: fewer than `most` means the last receive found\n"
"nothing waiting, after every callback had run. An exception from a callback propagates;\n"
"a libzmq error raises zmq.ZMQError if no message was read yet. With `with_user_id` true,\n"
"on_message gets a third argument: the ZAP User-Id of the sender's connection (str), or None.");

static PyObject *fz_drain(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "drain takes 6 arguments");
        return NULL;
    }
    if (!bound())
        return NULL;
    void *sock = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t most = PyLong_AsSsize_t(args[1]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    PyObject *on_message = args[3];
    PyObject *on_oversized = args[4];
    int with_user_id = PyObject_IsTrue(args[5]);
    if (with_user_id < 0 || PyErr_Occurred())
        return NULL;
    Py_ssize_t got = 0;
    while (got < most) {
        PyObject *first, *rest, *user_id = NULL;
        size_t biggest;
        int err;
        int rc = recv_message(sock, &first, &rest, &biggest, &err, with_user_id ? &user_id : NULL);
        if (rc == 0)
            break;
        if (rc < 0) {
            if (err != 0 && got > 0 && !PyErr_Occurred())
                break; /* hand over what was read; the next call meets the error again */
            if (err != 0 && !PyErr_Occurred())
                raise_zmq(err);
            return NULL;
        }
        got++;
        PyObject *result;
        if (limit >= 0 && biggest > (size_t)limit) {
            PyObject *size = PyLong_FromSize_t(biggest);
            PyObject *call[2] = {first, size};
            result = size == NULL ? NULL : PyObject_Vectorcall(on_oversized, call, 2, NULL);
            Py_XDECREF(size);
        } else {
            PyObject *call[3] = {first, rest, user_id};
            result = PyObject_Vectorcall(on_message, call, with_user_id ? 3 : 2, NULL);
        }
        Py_DECREF(first);
        Py_DECREF(rest);
        Py_XDECREF(user_id);
        if (result == NULL)
            return NULL;
        Py_DECREF(result);
    }
    return PyLong_FromSsize_t(got);
}

/* Send one frame; returns 0 or libzmq's errno. */
static int send_one(void *sock, PyObject *frame, int flags) {
    int rc;
    if (PyBytes_CheckExact(frame)) {
        do {
            rc = z_send(sock, PyBytes_AS_STRING(frame), (size_t)PyBytes_GET_SIZE(frame), flags);
        } while (rc < 0 && z_errno() == EINTR);
    } else if (Py_IS_TYPE(frame, &FrameType)) {
        zmq_msg_t copy; /* shares the buffer: libzmq counts references */
        z_msg_init(&copy);
        z_msg_copy(&copy, &((FrameObject *)frame)->msg);
        do {
            rc = z_msg_send(&copy, sock, flags);
        } while (rc < 0 && z_errno() == EINTR);
        if (rc < 0) {
            int err = z_errno();
            z_msg_close(&copy);
            return err;
        }
        return 0;
    } else {
        Py_buffer view;
        if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0)
            return -1;
        do {
            rc = z_send(sock, view.buf, (size_t)view.len, flags);
        } while (rc < 0 && z_errno() == EINTR);
        PyBuffer_Release(&view);
    }
    return rc < 0 ? z_errno() : 0;
}

PyDoc_STRVAR(send_from_doc,
"send_from(handle, outbox, start) -> tuple[int, int] | None\n\n"
"Send the messages outbox[start:] (each a list or tuple of bytes, Frame or other buffers)\n"
"without blocking, each as one multipart message. Returns None when all were sent, or\n"
"(index, errno) for the first message libzmq refused (EAGAIN: the peer's pipe is full;\n"
"EHOSTUNREACH: no such peer); the messages after it are not sent.");

static PyObject *fz_send_from(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send_from takes 3 arguments");
        return NULL;
    }
    if (!bound())
        return NULL;
    void *sock = PyLong_AsVoidPtr(args[0]);
    PyObject *outbox = args[1];
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(outbox)) {
        PyErr_SetString(PyExc_TypeError, "outbox must be a list");
        return NULL;
    }
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(outbox); i++) {
        PyObject *message = PyList_GET_ITEM(outbox, i);
        PyObject **frames;
        Py_ssize_t n;
        if (PyList_Check(message)) {
            frames = PySequence_Fast_ITEMS(message);
            n = PyList_GET_SIZE(message);
        } else if (PyTuple_Check(message)) {
            frames = PySequence_Fast_ITEMS(message);
            n = PyTuple_GET_SIZE(message);
        } else {
            PyErr_SetString(PyExc_TypeError, "a message must be a list or tuple of frames");
            return NULL;
        }
        if (n == 0) {
            PyErr_SetString(PyExc_ValueError, "a message needs at least one frame");
            return NULL;
        }
        for (Py_ssize_t j = 0; j < n; j++) {
            int err = send_one(sock, frames[j], j < n - 1 ? ZMQ_DONTWAIT | ZMQ_SNDMORE : ZMQ_DONTWAIT);
            if (err < 0)
                return NULL; /* not a buffer: TypeError set */
            if (err > 0) {
                if (j > 0) /* libzmq refuses at the first frame; a later refusal is a fault */
                    return raise_zmq(err);
                return Py_BuildValue("(ni)", i, err);
            }
        }
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)fz_bind, METH_VARARGS,
     "bind(addresses, error_class): the 12 libzmq function addresses (see mdp.fastzmq)."},
    {"drain", (PyCFunction)(void (*)(void))fz_drain, METH_FASTCALL, drain_doc},
    {"send_from", (PyCFunction)(void (*)(void))fz_send_from, METH_FASTCALL, send_from_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_mdp_fastzmq",
    "Whole messages in and out of a libzmq socket in one call (see mdp.fastzmq).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__mdp_fastzmq(void) {
    if (PyType_Ready(&FrameType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FrameType);
    if (PyModule_AddObject(m, "Frame", (PyObject *)&FrameType) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_HASH", MDP_SOURCE_HASH) < 0 ||
        PyModule_AddIntConstant(m, "BIG_FRAME", BIG_FRAME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
