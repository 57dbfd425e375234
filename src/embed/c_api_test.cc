// The C API: a migration driven from C (c_api_test_c.c), and its errors.
#include "faultline/faultline.h"

#include <cerrno>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

extern "C" int fl_c_api_roundtrip(int postcopy, char* why, size_t why_size);
extern "C" int fl_c_api_snapshot(int lazy, char* why, size_t why_size);
extern "C" int fl_c_api_page_server(char* why, size_t why_size);

namespace {

using ::testing::HasSubstr;

TEST(CApiTest, PrecopyFromC) {
  char why[512] = "";
  EXPECT_EQ(fl_c_api_roundtrip(0, why, sizeof why), 0) << why;
}

TEST(CApiTest, PostcopyFromC) {
  char why[512] = "";
  EXPECT_EQ(fl_c_api_roundtrip(1, why, sizeof why), 0) << why;
}

TEST(CApiTest, SnapshotAndEagerRestoreFromC) {
  char why[512] = "";
  EXPECT_EQ(fl_c_api_snapshot(0, why, sizeof why), 0) << why;
}

TEST(CApiTest, SnapshotAndLazyRestoreFromC) {
  char why[512] = "";
  EXPECT_EQ(fl_c_api_snapshot(1, why, sizeof why), 0) << why;
}

TEST(CApiTest, PageServerAndClientFromC) {
  char why[512] = "";
  EXPECT_EQ(fl_c_api_page_server(why, sizeof why), 0) << why;
}

TEST(CApiTest, ErrorsCarryACodeAndAMessage) {
  fl_error* error = nullptr;
  EXPECT_EQ(fl_outgoing_create(nullptr, nullptr, 0, nullptr, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_THAT(fl_error_message(error), HasSubstr("fl_vm_ops"));
  EXPECT_GT(fl_error_code(error), 0);
  fl_error_free(error);

  fl_vm_ops ops{};
  ops.vcpu_count = 1;
  ops.pause = [](void*) {};
  ops.resume = [](void*) {};
  ops.save_vcpu = [](void*, uint32_t, uint8_t**, size_t*) { return 0; };
  ops.load_vcpu = [](void*, uint32_t, const uint8_t*, size_t) { return 0; };
  ops.start = [](void*) { return 0; };
  fl_region region{"ram", 0, 4096, nullptr, -1, FL_BACKING_ANON};
  error = nullptr;
  EXPECT_EQ(fl_incoming_create(&ops, &region, 1, nullptr, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_THAT(fl_error_message(error), HasSubstr("host is NULL"));
  fl_error_free(error);

  // Without an error pointer: still NULL, nothing leaks.
  EXPECT_EQ(fl_incoming_create(&ops, &region, 1, nullptr, nullptr), nullptr);
  fl_error_free(nullptr);
  fl_outgoing_destroy(nullptr);
  fl_incoming_destroy(nullptr);

  error = nullptr;
  EXPECT_EQ(fl_page_server_create("/nonexistent", "/tmp/x.sock", 0, 0, nullptr, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_THAT(fl_error_message(error), HasSubstr("no snapshot manifest"));
  fl_error_free(error);
  error = nullptr;
  EXPECT_EQ(fl_page_client_connect(nullptr, &region, 1, nullptr, nullptr, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_EQ(fl_error_code(error), EINVAL);
  fl_error_free(error);
  fl_page_server_destroy(nullptr);
  fl_page_client_destroy(nullptr);
}

}  // namespace
